//! The dashboard: one page at `/` on every node's API, its script, style and vendored
//! library under `/assets/`, all embedded in the binary (`crates/api/assets/`), nothing
//! fetched from elsewhere. The page reads the JSON API (polling every 2 s and on every event
//! of `/v1/events/stream`) with the token the user pastes, so static files need no token and
//! data still does.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// One embedded file: its path under `/assets/`, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: &[u8] = include_bytes!("../assets/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/app.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/style.css"),
    },
    Asset {
        path: "vendor/alpine.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/vendor/alpine.min.js"),
    },
    Asset {
        path: "vendor/LICENSE-alpinejs.md",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../assets/vendor/LICENSE-alpinejs.md"),
    },
    Asset {
        path: "vendor/LICENSE-vue-reactivity",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../assets/vendor/LICENSE-vue-reactivity"),
    },
];

/// Scripts and styles from this origin only; Alpine.js evaluates its attribute expressions
/// with `new Function`, hence `'unsafe-eval'`. No inline script, nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self' 'unsafe-eval'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Small files: revalidated each time, so a new binary's page is never mixed with old code.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /`: the page.
pub(crate) async fn index() -> Response {
    let mut resp = file("text/html; charset=utf-8", INDEX);
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

/// `GET /assets/{*path}`: an embedded file, or 404.
pub(crate) async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(a) => file(a.content_type, a.body),
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

/// Whether `path` is one of the dashboard's static files (served without a token).
pub(crate) fn is_static(path: &str) -> bool {
    path == "/" || path.starts_with("/assets/")
}
