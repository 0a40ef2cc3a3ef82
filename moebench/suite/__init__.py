"""Suite files: YAML -> validated, expanded `Suite`; the JSON schema."""
