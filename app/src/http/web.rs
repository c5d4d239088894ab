//! The small web chat page (`/`) and its static assets (`/static/…`), embedded in the
//! binary. Assets are `public, max-age` (cacheable by the edge and browsers); the page
//! itself is revalidated so a new deployment is picked up.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::error::ApiError;
use super::{public, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/static/{file}", get(asset))
}

const INDEX: &str = include_str!("../../static/index.html");
const APP_JS: &str = include_str!("../../static/app.js");
const STYLE_CSS: &str = include_str!("../../static/style.css");

async fn index() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("public, no-cache")),
        ],
        INDEX,
    )
}

async fn asset(State(state): State<AppState>, Path(file): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let (body, ctype) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return Err(ApiError::NotFound),
    };
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
        public(state.settings.server.static_max_age.as_secs()),
        body,
    ))
}
