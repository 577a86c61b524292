"""A project that depends on attnlab and registers its own mechanism (README, "Extending an installed attnlab")."""
