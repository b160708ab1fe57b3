//! Conformance suite run against every store backend.
