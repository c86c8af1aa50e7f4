"""Every request and response shape of the HTTP API, one module per resource; routers stay thin."""
