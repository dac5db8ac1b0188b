//! Image operations of preprocessing: the clean view (centre square, resize)
//! and the train-only augmented views (random resized crop, horizontal flip,
//! colour jitter), each to a CHW u8 row ready for a shard.

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Train-only augmentation. Every copy is drawn from its own seeded stream
/// (seed, split, image id, copy), so shards do not depend on thread count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentParams {
    /// Augmented copies per training image, written after its clean view;
    /// 0 writes the clean view only.
    pub copies: u32,
    /// Crop area as a share of the image, drawn uniformly from this range.
    pub crop_scale: [f32; 2],
    /// Crop aspect ratio (w/h), drawn log-uniformly from this range.
    pub crop_ratio: [f32; 2],
    /// Flip horizontally with probability 1/2. Safe here: no caption names
    /// left or right.
    pub flip: bool,
    /// Strength of brightness, contrast and saturation jitter: each factor is
    /// drawn from [1 - jitter, 1 + jitter]. Hue is never changed, since
    /// colour words are part of the captions.
    pub jitter: f32,
}

impl Default for AugmentParams {
    fn default() -> Self {
        Self {
            copies: 1,
            crop_scale: [0.6, 1.0],
            crop_ratio: [0.8, 1.25],
            flip: true,
            jitter: 0.2,
        }
    }
}

impl AugmentParams {
    /// Messages for every out-of-range field.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let [a, b] = self.crop_scale;
        if !(a > 0.0 && a <= b && b <= 1.0) {
            p.push(format!(
                "augment.crop_scale {:?} must satisfy 0 < lo <= hi <= 1",
                self.crop_scale
            ));
        }
        let [a, b] = self.crop_ratio;
        if !(a > 0.0 && a <= b && b.is_finite()) {
            p.push(format!(
                "augment.crop_ratio {:?} must satisfy 0 < lo <= hi",
                self.crop_ratio
            ));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            p.push(format!("augment.jitter {} must be in [0, 1)", self.jitter));
        }
        p
    }
}

/// Packs an RGB image into CHW bytes.
fn to_chw(img: &RgbImage) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0u8; plane * 3];
    for (i, p) in img.pixels().enumerate() {
        out[i] = p[0];
        out[plane + i] = p[1];
        out[2 * plane + i] = p[2];
    }
    out
}

/// The clean view: the centred square of the shorter side, resized.
pub(crate) fn clean_view(img: &RgbImage, size: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    let view = imageops::crop_imm(img, (w - s) / 2, (h - s) / 2, s, s).to_image();
    let out = if s == size {
        view
    } else {
        imageops::resize(&view, size, size, FilterType::Triangle)
    };
    to_chw(&out)
}

/// One augmented view drawn from `rng`.
pub(crate) fn augmented_view<R: Rng>(
    img: &RgbImage,
    size: u32,
    p: &AugmentParams,
    rng: &mut R,
) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let area = (w * h) as f32;
    let (lo, hi) = (p.crop_ratio[0].ln(), p.crop_ratio[1].ln());
    // As torchvision's RandomResizedCrop: a few tries, then the full image.
    let mut rect = (0, 0, w, h);
    for _ in 0..10 {
        let target = area * rng.gen_range(p.crop_scale[0]..=p.crop_scale[1]);
        let ratio = if hi > lo {
            rng.gen_range(lo..=hi).exp()
        } else {
            lo.exp()
        };
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw >= 1 && ch >= 1 && cw <= w && ch <= h {
            rect = (rng.gen_range(0..=w - cw), rng.gen_range(0..=h - ch), cw, ch);
            break;
        }
    }
    let crop = imageops::crop_imm(img, rect.0, rect.1, rect.2, rect.3).to_image();
    let mut out = imageops::resize(&crop, size, size, FilterType::Triangle);
    if p.flip && rng.gen_bool(0.5) {
        imageops::flip_horizontal_in_place(&mut out);
    }
    if p.jitter > 0.0 {
        let j = p.jitter;
        let bright = rng.gen_range(1.0 - j..=1.0 + j);
        let contrast = rng.gen_range(1.0 - j..=1.0 + j);
        let sat = rng.gen_range(1.0 - j..=1.0 + j);
        let luma = |p: &[f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let mean: f32 = out
            .pixels()
            .map(|px| luma(&px.0.map(f32::from)))
            .sum::<f32>()
            / (size * size) as f32
            * bright;
        for px in out.pixels_mut() {
            let mut v = px.0.map(|c| f32::from(c) * bright);
            for c in &mut v {
                *c = (*c - mean) * contrast + mean;
            }
            let g = luma(&v);
            px.0 = v.map(|c| (g + (c - g) * sat).round().clamp(0.0, 255.0) as u8);
        }
    }
    to_chw(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn views_have_chw_shape_and_clean_view_keeps_colour() {
        let img = RgbImage::from_fn(40, 30, |_, _| image::Rgb([200, 10, 30]));
        let v = clean_view(&img, 16);
        assert_eq!(v.len(), 3 * 16 * 16);
        assert!(v[..256].iter().all(|&c| c == 200) && v[256..512].iter().all(|&c| c == 10));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let a = augmented_view(&img, 16, &AugmentParams::default(), &mut rng);
        assert_eq!(a.len(), 3 * 16 * 16);
        // Jitter keeps red the dominant channel.
        assert!(a[..256].iter().zip(&a[256..512]).all(|(r, g)| r > g));
    }
}
