mod backend_docs;
mod bad_input;
mod cli;
pub mod harness;
mod hygiene;
mod invariant;
mod login;
mod proxy;
mod redirects;
