//! Configuration sources: each turns its input into typed [`crate::config::Object`]s and sends
//! batches of [`crate::config::ConfigEvent`]s downstream.

pub mod files;
pub mod kube;
mod parse;
