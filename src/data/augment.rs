//! Image operations of preprocessing: the clean view (centre square, resize)
//! and the train-only augmented views (random resized crop, horizontal flip,
//! colour jitter), each to a CHW u8 row ready for a shard.

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

/// Source taps and weights of each output sample along one axis, for the
/// span `[start, start + len)` of the source resampled to `out` samples.
/// Downscaling averages the exact area each output sample covers (a box
/// filter, so no aliasing and the mean colour is kept); upscaling is linear.
fn axis_weights(start: u32, len: u32, out: u32, src_len: u32) -> Vec<(usize, Vec<f32>)> {
    let scale = len as f64 / out as f64;
    (0..out)
        .map(|i| {
            if scale >= 1.0 {
                let a = start as f64 + i as f64 * scale;
                let b = a + scale;
                let first = a.floor() as usize;
                // Never past the span, whatever the rounding.
                let last = (b.ceil() as usize).min((start + len).min(src_len) as usize);
                let w = (first..last)
                    .map(|k| ((b.min(k as f64 + 1.0) - a.max(k as f64)) / scale) as f32)
                    .collect();
                (first, w)
            } else {
                let c = start as f64 + (i as f64 + 0.5) * scale - 0.5;
                let lo = c.floor().clamp(start as f64, (start + len - 1) as f64);
                let t = (c - lo).clamp(0.0, 1.0) as f32;
                let lo = lo as usize;
                if lo + 1 < (start + len) as usize {
                    (lo, vec![1.0 - t, t])
                } else {
                    (lo, vec![1.0])
                }
            }
        })
        .collect()
}

/// Resamples the rectangle `(x, y, w, h)` of `img` to `size`x`size` and
/// returns it as CHW bytes. Separable: rows first into an f32 buffer, then
/// columns (this is the hot loop of preprocessing).
fn resample_chw(img: &RgbImage, (x, y, w, h): (u32, u32, u32, u32), size: u32) -> Vec<u8> {
    let (iw, ih) = img.dimensions();
    let xs = axis_weights(x, w, size, iw);
    let ys = axis_weights(y, h, size, ih);
    let raw = img.as_raw();
    let stride = iw as usize * 3;
    let n = size as usize;
    // Only the source rows some output row reads.
    let (row0, row1) = (y as usize, ((y + h) as usize).min(ih as usize));
    let mut tmp = vec![0f32; (row1 - row0) * n * 3];
    for r in row0..row1 {
        let src = &raw[r * stride..(r + 1) * stride];
        let dst = &mut tmp[(r - row0) * n * 3..(r - row0 + 1) * n * 3];
        for (i, (first, wts)) in xs.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, wt) in wts.iter().enumerate() {
                let px = &src[(first + k) * 3..(first + k) * 3 + 3];
                acc[0] += wt * f32::from(px[0]);
                acc[1] += wt * f32::from(px[1]);
                acc[2] += wt * f32::from(px[2]);
            }
            dst[i * 3..i * 3 + 3].copy_from_slice(&acc);
        }
    }
    let plane = n * n;
    let mut out = vec![0u8; plane * 3];
    let mut acc = vec![0f32; n * 3];
    for (j, (first, wts)) in ys.iter().enumerate() {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, wt) in wts.iter().enumerate() {
            let r = first + k - row0;
            for (a, v) in acc.iter_mut().zip(&tmp[r * n * 3..(r + 1) * n * 3]) {
                *a += wt * v;
            }
        }
        for i in 0..n {
            for c in 0..3 {
                out[c * plane + j * n + i] = (acc[i * 3 + c] + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// The clean view: the centred square of the shorter side, resized.
pub(crate) fn clean_view(img: &RgbImage, size: u32) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let s = w.min(h);
    resample_chw(img, ((w - s) / 2, (h - s) / 2, s, s), size)
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
    let mut out = resample_chw(img, rect, size);
    let n = size as usize;
    let plane = n * n;
    if p.flip && rng.gen_bool(0.5) {
        for row in out.chunks_exact_mut(n) {
            row.reverse();
        }
    }
    if p.jitter > 0.0 {
        let j = p.jitter;
        let bright = rng.gen_range(1.0 - j..=1.0 + j);
        let contrast = rng.gen_range(1.0 - j..=1.0 + j);
        let sat = rng.gen_range(1.0 - j..=1.0 + j);
        let luma = |r: f32, g: f32, b: f32| 0.299 * r + 0.587 * g + 0.114 * b;
        let (rs, rest) = out.split_at_mut(plane);
        let (gs, bs) = rest.split_at_mut(plane);
        let mean = (0..plane)
            .map(|i| luma(f32::from(rs[i]), f32::from(gs[i]), f32::from(bs[i])))
            .sum::<f32>()
            / plane as f32
            * bright;
        for i in 0..plane {
            let v = [rs[i], gs[i], bs[i]].map(|c| (f32::from(c) * bright - mean) * contrast + mean);
            let g = luma(v[0], v[1], v[2]);
            let [r, gg, b] = v.map(|c| (g + (c - g) * sat).round().clamp(0.0, 255.0) as u8);
            (rs[i], gs[i], bs[i]) = (r, gg, b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn box_downscale_averages_and_upscale_interpolates() {
        // 4x4 checker of 0/200 halves to a flat 100; a 2x2 gradient upscales
        // to values between its corners.
        let img = RgbImage::from_fn(4, 4, |x, y| {
            image::Rgb([if (x + y) % 2 == 0 { 0 } else { 200 }; 3])
        });
        assert!(resample_chw(&img, (0, 0, 4, 4), 2)
            .iter()
            .all(|&v| v == 100));
        let img = RgbImage::from_fn(2, 2, |x, _| image::Rgb([if x == 0 { 0 } else { 100 }; 3]));
        let up = resample_chw(&img, (0, 0, 2, 2), 4);
        assert_eq!(&up[..4], &[0, 25, 75, 100]);
        // A crop reads only its own rectangle.
        let img = RgbImage::from_fn(6, 6, |x, _| image::Rgb([if x < 3 { 10 } else { 250 }; 3]));
        assert!(resample_chw(&img, (3, 1, 3, 3), 2)
            .iter()
            .all(|&v| v == 250));
    }

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
