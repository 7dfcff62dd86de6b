//! The web page (`GET /`) and its same-origin assets, embedded in the binary: no CDN, no
//! build step. The page is open; every prediction it makes carries the credentials the
//! person typed into its sign-in form (see `page/app.js` for why the browser's own dialog
//! never pops up over that form).
//!
//! Every page response carries a strict Content-Security-Policy: scripts and styles only
//! from this origin (no `unsafe-inline`, no `eval`), images only from here or from the
//! page's own canvases (`blob:`), requests only to this origin, no framing.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");
const ICON: &str = include_str!("page/icon.svg");

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// One of the page's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    Index,
    Script,
    Style,
    Icon,
}

impl Asset {
    /// The asset at a path (`/`, `/ui/app.js`, `/ui/app.css`, `/ui/icon.svg`).
    pub fn resolve(segments: &[&str]) -> Option<Asset> {
        Some(match segments {
            [""] => Asset::Index,
            ["ui", "app.js"] => Asset::Script,
            ["ui", "app.css"] => Asset::Style,
            ["ui", "icon.svg"] => Asset::Icon,
            _ => return None,
        })
    }

    pub fn path(self) -> &'static str {
        match self {
            Asset::Index => "/",
            Asset::Script => "/ui/app.js",
            Asset::Style => "/ui/app.css",
            Asset::Icon => "/ui/icon.svg",
        }
    }
}

/// The response for an asset; the page names the served model (for its sign-in check).
pub fn response(asset: Asset, model_name: &str) -> Response<Full<Bytes>> {
    let (body, mime): (Bytes, &str) = match asset {
        Asset::Index => (
            INDEX
                .replace("{{MODEL}}", &crate::html::escape(model_name))
                .into(),
            "text/html; charset=utf-8",
        ),
        Asset::Script => (SCRIPT.into(), "text/javascript; charset=utf-8"),
        Asset::Style => (STYLE.into(), "text/css; charset=utf-8"),
        Asset::Icon => (ICON.into(), "image/svg+xml"),
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(mime));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    // Small files, revalidated: a new server version is seen at once.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_resolve_and_carry_the_policy() {
        for a in [Asset::Index, Asset::Script, Asset::Style, Asset::Icon] {
            let segs: Vec<&str> = a.path().trim_start_matches('/').split('/').collect();
            assert_eq!(Asset::resolve(&segs), Some(a));
            let r = response(a, "m");
            assert_eq!(r.headers()["content-security-policy"], CSP);
            assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        }
        assert_eq!(Asset::resolve(&["ui", "other.js"]), None);
        assert!(!CSP.contains("unsafe"));
    }

    #[test]
    fn the_page_names_the_model_escaped() {
        use http_body_util::BodyExt;
        let r = response(Asset::Index, "a\"<b>");
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(r.into_body().collect())
            .unwrap()
            .to_bytes();
        let html = std::str::from_utf8(&body).unwrap();
        assert!(html.contains(r#"<meta name="fmnist-model" content="a&quot;&lt;b&gt;">"#));
        assert!(!html.contains("{{MODEL}}"));
    }

    /// Nothing inline: CSP `script-src 'self'` / `style-src 'self'` would block it.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        assert!(!INDEX.contains("<style"));
        assert!(!INDEX.contains(" style="));
        // No inline event handlers (` onclick=` and the like).
        for (i, _) in INDEX.match_indices(" on") {
            let word: String = INDEX[i + 3..]
                .chars()
                .take_while(char::is_ascii_lowercase)
                .collect();
            assert!(
                !INDEX[i + 3 + word.len()..].starts_with('='),
                "inline handler on{word}"
            );
        }
        let scripts = INDEX.matches("<script").count();
        assert_eq!(scripts, INDEX.matches("<script src=\"/ui/").count());
    }
}
