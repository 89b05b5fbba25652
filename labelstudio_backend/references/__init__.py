"""A project's in-context examples: reference sources for the model, the webhook inbox that keeps Label Studio's events, and the sync of annotations from Label Studio's API."""
