//! The demo ESP console: campaigns, a "send campaign" form, API keys, and a panel showing the
//! identity received from the gateway. Every request must carry a valid gateway assertion.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;

use crate::config::Config;
use crate::token::Claims;

/// State of the console.
#[derive(Clone)]
pub struct ConsoleState {
    jwks_url: String,
    header: String,
    audience: String,
    issuer: String,
    jwks: Arc<Mutex<Option<(Instant, serde_json::Value)>>>,
    campaigns: Arc<Mutex<Vec<Campaign>>>,
    api_keys: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct Campaign {
    name: String,
    recipients: u32,
    status: String,
    sent_by: String,
}

impl ConsoleState {
    pub fn new(jwks_url: String, config: &Config) -> Self {
        Self {
            jwks_url,
            header: config.token.header.clone(),
            audience: config.token.audience.clone(),
            issuer: config.issuer(),
            jwks: Arc::new(Mutex::new(None)),
            campaigns: Arc::new(Mutex::new(vec![
                Campaign {
                    name: "October newsletter".into(),
                    recipients: 12840,
                    status: "sent".into(),
                    sent_by: "ops@example.com".into(),
                },
                Campaign {
                    name: "Black Friday preview".into(),
                    recipients: 9911,
                    status: "draft".into(),
                    sent_by: "-".into(),
                },
            ])),
            api_keys: Arc::new(Mutex::new(vec![
                "esp_live_…8f2a (created 2026-09-02)".into()
            ])),
        }
    }

    /// The JWKS, cached for a minute and re-fetched when a token names an unknown key.
    async fn jwks(&self, force: bool) -> Option<serde_json::Value> {
        if !force {
            if let Ok(g) = self.jwks.lock() {
                if let Some((at, v)) = g.as_ref() {
                    if at.elapsed() < Duration::from_secs(60) {
                        return Some(v.clone());
                    }
                }
            }
        }
        let text = super::fetch_text(&self.jwks_url).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        if let Ok(mut g) = self.jwks.lock() {
            *g = Some((Instant::now(), v.clone()));
        }
        Some(v)
    }

    async fn verify(&self, headers: &HeaderMap) -> Result<Claims, String> {
        let token = headers
            .get(self.header.as_str())
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                format!(
                    "no {} header: requests must come through Portcullis",
                    self.header
                )
            })?;
        for force in [false, true] {
            let Some(set) = self.jwks(force).await else {
                continue;
            };
            if let Ok(c) = crate::token::verify(token, &set, &self.audience, Some(&self.issuer), 30)
            {
                return Ok(c);
            }
        }
        Err("the Portcullis assertion did not verify".into())
    }
}

#[derive(Template)]
#[template(path = "demo/console.html")]
struct Page<'a> {
    page: &'a str,
    claims: &'a Claims,
    claims_json: &'a str,
    campaigns: &'a [Campaign],
    api_keys: &'a [String],
    message: Option<&'a str>,
}

async fn require_assertion(
    State(state): State<ConsoleState>,
    mut req: Request,
    next: Next,
) -> Response {
    match state.verify(req.headers()).await {
        Ok(claims) => {
            req.extensions_mut().insert(claims);
            next.run(req).await
        }
        Err(why) => (
            StatusCode::UNAUTHORIZED,
            Html(format!(
                "<!doctype html><title>Refused</title><h1>Refused</h1><p>{}</p>",
                html_escape(&why)
            )),
        )
            .into_response(),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn render(state: &ConsoleState, claims: &Claims, page: &str, message: Option<&str>) -> Response {
    let campaigns = state
        .campaigns
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    let api_keys = state.api_keys.lock().map(|k| k.clone()).unwrap_or_default();
    let claims_json = serde_json::to_string_pretty(claims).unwrap_or_default();
    let p = Page {
        page,
        claims,
        claims_json: &claims_json,
        campaigns: &campaigns,
        api_keys: &api_keys,
        message,
    };
    match p.render() {
        Ok(h) => Html(h).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn home(State(s): State<ConsoleState>, Extension(c): Extension<Claims>) -> Response {
    render(&s, &c, "home", None)
}

async fn campaigns(State(s): State<ConsoleState>, Extension(c): Extension<Claims>) -> Response {
    render(&s, &c, "campaigns", None)
}

async fn send_form(State(s): State<ConsoleState>, Extension(c): Extension<Claims>) -> Response {
    render(&s, &c, "send", None)
}

#[derive(Deserialize)]
struct SendForm {
    name: String,
    #[serde(default)]
    recipients: u32,
}

async fn send_post(
    State(s): State<ConsoleState>,
    Extension(c): Extension<Claims>,
    Form(f): Form<SendForm>,
) -> Response {
    let name: String = f.name.chars().take(120).collect();
    if let Ok(mut list) = s.campaigns.lock() {
        list.insert(
            0,
            Campaign {
                name: name.clone(),
                recipients: f.recipients,
                status: "queued".into(),
                sent_by: c.email.clone(),
            },
        );
    }
    render(
        &s,
        &c,
        "campaigns",
        Some(&format!("Campaign “{name}” queued for sending.")),
    )
}

async fn keys(State(s): State<ConsoleState>, Extension(c): Extension<Claims>) -> Response {
    render(&s, &c, "api-keys", None)
}

async fn keys_post(State(s): State<ConsoleState>, Extension(c): Extension<Claims>) -> Response {
    let key = format!("esp_live_{}", crate::crypto::random_token(18));
    if let Ok(mut k) = s.api_keys.lock() {
        k.push(format!(
            "esp_live_…{} (created just now by {})",
            &key[key.len() - 4..],
            c.email
        ));
    }
    render(
        &s,
        &c,
        "api-keys",
        Some(&format!("New API key (shown once): {key}")),
    )
}

async fn whoami(Extension(c): Extension<Claims>) -> Json<Claims> {
    Json(c)
}

/// The console's routes.
pub fn console_router(state: ConsoleState) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/campaigns", get(campaigns))
        .route("/campaigns/new", get(send_form))
        .route(
            "/campaigns/send",
            axum::routing::post(send_post).get(|| async { Redirect::to("/campaigns/new") }),
        )
        .route("/api-keys", get(keys).post(keys_post))
        .route("/whoami", get(whoami))
        .fallback(|| async {
            (
                axum::http::StatusCode::NOT_FOUND,
                axum::response::Html(
                    "<!doctype html><title>Not found</title><p>The demo console has no such \
                     page. <a href=\"/\">Back to the console</a></p>",
                ),
            )
        })
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::response::Html(
                    "<!doctype html><title>Not available this way</title><p>The demo console \
                     does not take this method here. <a href=\"/\">Back to the console</a></p>",
                ),
            )
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_assertion,
        ))
        .with_state(state)
}
