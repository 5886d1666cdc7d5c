"""Handler-side API: the Context a handler receives, its errors, BaseHandler and the built-ins."""
