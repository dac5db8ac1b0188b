//! Caption metrics (being written): tokenization, BLEU, ROUGE-L, CIDEr-D, bootstrap.
pub mod cmd;
