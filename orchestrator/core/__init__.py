"""The core every other package stands on: errors and exit statuses, events, paths, names, small parsers."""
