//! The one shared application state.
