//! Integration tests: the real gateway on 127.0.0.1:0, a real upstream HTTP server, real SQLite
//! and PostgreSQL, driven over HTTP with a cookie-keeping client that never follows redirects.
mod it;
