//! Reports (being written): terminal tables, plots, HTML.
pub mod cmd;
