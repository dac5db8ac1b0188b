//! The model inputs ecic feeds an export, for checking the export elsewhere with the very same
//! pixels (scripts/hf-llava-check.sh hands them to transformers): every image of a MUGE .tsv
//! prepared as `ecic predict` prepares it, written as one safetensors tensor `pixel_values`
//! (images, 3, size, size) and the image ids, one a line.
//!
//! Usage: export_pixels EXPORT_DIR IMAGES.tsv OUT.safetensors OUT_IDS.txt

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use ecic::infer::images::ImageSource;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() == 5,
        "usage: export_pixels EXPORT_DIR IMAGES.tsv OUT.safetensors OUT_IDS.txt"
    );
    let m = ecic::infer::export::manifest(a[1].as_ref())?;
    let src = ImageSource::open(a[2].as_ref())?;
    let (mut ids, mut data) = (Vec::new(), Vec::new());
    src.for_each_chunk(&m.image, 64, &mut |chunk| {
        for p in chunk {
            match p.pixels {
                Ok(px) => {
                    ids.push(p.id);
                    data.extend(px);
                }
                Err(e) => eprintln!("skipped {}: {e}", p.origin),
            }
        }
        Ok(())
    })?;
    let s = m.image.size as usize;
    let t = Tensor::from_vec(data, (ids.len(), 3, s, s), &Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("pixel_values".to_owned(), t)]), &a[3])?;
    std::fs::write(&a[4], ids.join("\n") + "\n")?;
    Ok(())
}
