//! Data: the first step of every pipeline. MUGE ECommerce-IC files are read
//! and validated ([`muge`]), the embedded default data set is drawn
//! ([`synth`]), images are decoded once into tensor shards and captions into
//! token ids ([`preprocess`], [`tokenizer`]) so that training never touches
//! a JPEG.

pub mod cmd;
pub mod inspect;
mod lines;
pub mod muge;
pub mod synth;
pub mod tokenizer;
