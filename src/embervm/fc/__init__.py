"""The Firecracker v1.16.1 front end: request models, the API rules, the HTTP server and CLI."""
