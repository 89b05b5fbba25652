"""The HTTP side: the Flask app and its routes (Label Studio's ML backend protocol), basic auth, the credentials on Label Studio's webhook, and /metrics."""
