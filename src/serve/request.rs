//! Reading a captioning request: images as multipart parts or as base64 in JSON, plus
//! optional decoding options; every refusal names the part it is about.
//!
//! JSON: `{"images": ["<base64>", {"id": "sku-1", "data": "<base64>"}, ...],
//! "options": {"method": "beam", "beam_width": 3, ...}}` (options as `ecic predict`'s decoding
//! flags, snake_case). Multipart: every part is an image (its id: the file name without
//! extension, else the field name), except a part named `options` holding that JSON object.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use rayon::prelude::*;
use serde::Deserialize;

use crate::infer::cmd::DecodeArgs;
use crate::infer::ImageSpec;

/// A refusal: the status and what to tell the client.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    pub fn bad(message: impl Into<String>) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// One image of a request, still encoded.
pub struct Part {
    pub id: String,
    /// How errors name it: `images[2]` or `part 3 ("photo")`.
    pub label: String,
    pub bytes: Result<Vec<u8>, String>,
}

/// A request read but not yet decoded.
pub struct Parsed {
    pub parts: Vec<Part>,
    pub options: DecodeArgs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBody {
    images: Vec<JsonImage>,
    #[serde(default)]
    options: DecodeArgs,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonImage {
    Bare(String),
    Named {
        #[serde(default)]
        id: Option<String>,
        data: String,
    },
}

/// Reads the request body by its content type. Over the body limit: 413.
pub async fn parse(req: Request) -> Result<Parsed, Refusal> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| Refusal {
                status: e.status(),
                message: e.body_text(),
            })?;
        multipart(mp).await
    } else if ctype.starts_with("application/json") {
        let body = Bytes::from_request(req, &()).await.map_err(|e| Refusal {
            status: e.status(),
            message: e.body_text(),
        })?;
        json(&body)
    } else {
        Err(Refusal {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: format!(
                "content type `{ctype}`: send multipart/form-data (one image per part) or application/json (base64 images)"
            ),
        })
    }
}

fn json(body: &[u8]) -> Result<Parsed, Refusal> {
    let b: JsonBody =
        serde_json::from_slice(body).map_err(|e| Refusal::bad(format!("JSON body: {e}")))?;
    let parts = b
        .images
        .into_iter()
        .enumerate()
        .map(|(i, img)| {
            let (id, data) = match img {
                JsonImage::Bare(d) => (None, d),
                JsonImage::Named { id, data } => (id, data),
            };
            Part {
                id: id.unwrap_or_else(|| i.to_string()),
                label: format!("images[{i}]"),
                bytes: crate::data::muge::decode_base64(data.trim())
                    .map_err(|e| format!("bad base64: {e}")),
            }
        })
        .collect();
    Ok(Parsed {
        parts,
        options: b.options,
    })
}

async fn multipart(mut mp: Multipart) -> Result<Parsed, Refusal> {
    let mut parts = Vec::new();
    let mut options = DecodeArgs::default();
    let mut index = 0usize;
    loop {
        let field = mp.next_field().await.map_err(|e| Refusal {
            status: e.status(),
            message: format!("part {index}: {}", e.body_text()),
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or("").to_owned();
        let file = field.file_name().map(str::to_owned);
        let label = format!("part {index} (\"{name}\")");
        let bytes = field.bytes().await.map_err(|e| Refusal {
            status: e.status(),
            message: format!("{label}: {}", e.body_text()),
        })?;
        if name == "options" && file.is_none() {
            options = serde_json::from_slice(&bytes)
                .map_err(|e| Refusal::bad(format!("{label}: options: {e}")))?;
        } else {
            let id = file
                .as_deref()
                .map(|f| {
                    std::path::Path::new(f)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| name.clone());
            parts.push(Part {
                id,
                label,
                bytes: Ok(bytes.to_vec()),
            });
        }
        index += 1;
    }
    Ok(Parsed { parts, options })
}

/// Decodes and prepares every image (in parallel); the first bad one refuses the request,
/// naming its part.
pub fn prepare(parts: Vec<Part>, spec: &ImageSpec) -> Result<Vec<(String, Vec<f32>)>, Refusal> {
    parts
        .into_par_iter()
        .map(|p| {
            let bytes = p
                .bytes
                .map_err(|e| Refusal::bad(format!("{}: {e}", p.label)))?;
            let px = spec
                .prepare(&bytes)
                .map_err(|e| Refusal::bad(format!("{}: {e}", p.label)))?;
            Ok((p.id, px))
        })
        .collect()
}
