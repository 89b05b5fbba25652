"""Reaching the outside: HTTP that connects only to checked addresses, the Label Studio API client, and task images."""
