"""What users write: inventory, profiles and playbooks, read strictly (file, line and key in every error)."""
