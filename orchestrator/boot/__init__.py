"""Boot changes: kernel cmdline and kernel artifacts, applied through trial boots that cannot brick a unit."""
