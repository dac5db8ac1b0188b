//! Data (being written): MUGE reader/writer, synthetic data, preprocessing, tokenizer.
pub mod cmd;
