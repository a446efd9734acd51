//! TODO: the WebSocket endpoint.
