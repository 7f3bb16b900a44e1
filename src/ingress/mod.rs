//! Ingress: what a CMS talks to. Accepts connections (HTTP/1.1, HTTP/2, TLS),
//! and turns each webhook into a stored event and a `202`.

pub mod auth;
mod budget;
pub mod formats;
mod handler;
mod server;
pub mod tls;

pub use handler::{Ingress, Routes};
pub use server::serve;
