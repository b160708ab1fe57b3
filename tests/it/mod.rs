mod bad_input;
mod cli;
pub mod harness;
mod invariant;
mod login;
mod proxy;
mod redirects;
mod hygiene;
