"""Reports people read: self-contained HTML with plots, and their JSON."""
