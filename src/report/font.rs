//! Text for the plots, Chinese included, without depending on the machine's
//! fonts: a subset of WenQuanYi Micro Hei (ASCII, common punctuation and the
//! 6,763 hanzi of GB 2312; Apache-2.0, see `assets/fonts/`) is compiled in.
//! Characters outside it fall back to a system CJK font when one is found
//! (`ECIC_CJK_FONT`, or Debian's Noto CJK / WenQuanYi paths), else they draw
//! as the font's empty box.
//!
//! plotters' own text path goes through fontconfig and finds whatever the
//! machine has (often no CJK at all), so [`super::backend`] routes every
//! label through [`Fonts::draw`] instead.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{Font, FontArc, GlyphId, PxScale, ScaleFont};

/// The bundled subset (see `assets/fonts/README.md` for how it was made).
static BUNDLED: &[u8] = include_bytes!("../../assets/fonts/wqy-microhei-gb2312.ttf");

/// System fonts tried, in order, for characters the subset lacks.
const SYSTEM_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJKsc-Regular.otf",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
];

/// The faces text is drawn with: the bundled one first, then fallbacks.
pub struct Fonts {
    faces: Vec<FontArc>,
    /// Where each fallback face came from (for the report's provenance).
    pub fallback: Option<PathBuf>,
}

impl Fonts {
    /// The process-wide font set (loaded once).
    pub fn shared() -> &'static Fonts {
        static FONTS: OnceLock<Fonts> = OnceLock::new();
        FONTS.get_or_init(Fonts::load)
    }

    fn load() -> Fonts {
        let mut faces = Vec::new();
        // the bundled bytes are checked by a test; a broken build would
        // show empty boxes rather than fail the report
        if let Ok(f) = ab_glyph::FontRef::try_from_slice(BUNDLED) {
            faces.push(FontArc::new(f));
        }
        let env = std::env::var_os("ECIC_CJK_FONT").map(PathBuf::from);
        let mut fallback = None;
        for path in env
            .iter()
            .map(PathBuf::as_path)
            .chain(SYSTEM_CANDIDATES.iter().map(Path::new))
        {
            if let Some(face) = load_file(path) {
                faces.push(face);
                fallback = Some(path.to_path_buf());
                break;
            }
        }
        Fonts { faces, fallback }
    }

    /// Only the bundled face (tests: results must not depend on the machine).
    pub fn bundled_only() -> Fonts {
        let faces = ab_glyph::FontRef::try_from_slice(BUNDLED)
            .map(|f| vec![FontArc::new(f)])
            .unwrap_or_default();
        Fonts {
            faces,
            fallback: None,
        }
    }

    /// The face and glyph that draw `c` (glyph 0, the empty box, when none has it).
    fn glyph(&self, c: char) -> Option<(&FontArc, GlyphId)> {
        let first = self.faces.first()?;
        for f in &self.faces {
            let id = f.glyph_id(c);
            if id.0 != 0 {
                return Some((f, id));
            }
        }
        Some((first, first.glyph_id(c)))
    }

    /// Whether some face has a real glyph for `c`.
    pub fn covers(&self, c: char) -> bool {
        c.is_whitespace() || self.faces.iter().any(|f| f.glyph_id(c).0 != 0)
    }

    /// Line box of `text` at `px` pixels: (width, height).
    pub fn measure(&self, text: &str, px: f32) -> (u32, u32) {
        let Some(first) = self.faces.first() else {
            return (0, 0);
        };
        let line = first.as_scaled(PxScale::from(px));
        let w: f32 = text
            .chars()
            .filter_map(|c| self.glyph(c))
            .map(|(f, id)| f.as_scaled(PxScale::from(px)).h_advance(id))
            .sum();
        (
            w.ceil() as u32,
            (line.ascent() - line.descent()).ceil() as u32,
        )
    }

    /// Rasterise `text` with its line box's top-left at (0, 0); `put(x, y,
    /// coverage)` receives every covered pixel.
    pub fn draw(&self, text: &str, px: f32, mut put: impl FnMut(i32, i32, f32)) {
        let Some(first) = self.faces.first() else {
            return;
        };
        let ascent = first.as_scaled(PxScale::from(px)).ascent();
        let mut x = 0.0f32;
        for c in text.chars() {
            let Some((face, id)) = self.glyph(c) else {
                continue;
            };
            let scaled = face.as_scaled(PxScale::from(px));
            let glyph = id.with_scale_and_position(PxScale::from(px), ab_glyph::point(x, ascent));
            x += scaled.h_advance(id);
            if let Some(outline) = face.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, cov| {
                    if cov > 0.0 {
                        put(
                            b.min.x as i32 + gx as i32,
                            b.min.y as i32 + gy as i32,
                            cov.min(1.0),
                        );
                    }
                });
            }
        }
    }
}

fn load_file(path: &Path) -> Option<FontArc> {
    let bytes = std::fs::read(path).ok()?;
    // collections (.ttc): the first face is the Simplified Chinese or
    // regular one in the Debian packages listed above
    ab_glyph::FontVec::try_from_vec_and_index(bytes, 0)
        .ok()
        .map(FontArc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_subset_covers_common_hanzi_and_ascii() {
        let f = Fonts::bundled_only();
        for c in "CIDEr-D 0.5 ×±·，。连衣裙白色纯棉宽松显瘦夏季新款".chars() {
            assert!(f.covers(c), "{c:?} missing from the bundled font");
        }
        // a rare character outside GB 2312 is not in the subset
        assert!(!f.covers('𠀀'));
    }
}
