//! The HTTP door: `/healthz` is open to probes; everything else needs a token, as a bearer
//! header (Prometheus, scripts) or as the cookie the login form sets (the web page). Every request
//! also names an allowed host, so a web page elsewhere cannot reach a coordinator on this
//! machine by pointing its own domain name at 127.0.0.1 (DNS rebinding).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::Principal;
use crate::control::Coordinator;
use crate::error::Error;

/// The web page's session: the token itself, HttpOnly so page scripts never see it.
pub const COOKIE: &str = "gantry_token";

pub async fn require_token(State(c): State<Arc<Coordinator>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return next.run(req).await;
    }
    if let Err(e) = check_host(&c, req.headers(), req.method()) {
        return e.into_response();
    }
    if path == "/login" || path == "/logout" {
        return next.run(req).await;
    }
    let who = if c.settings.auth {
        let found = token_in(req.headers())
            .ok_or_else(|| Error::Unauthenticated("no token: send `Authorization: Bearer TOKEN`".into()))
            .and_then(|secret| c.tokens.authenticate(&secret, c.now_ms()));
        match found {
            Ok(who) => who,
            // People get the login form; programs get the status.
            Err(_) if path == "/" => return Redirect::to("/login").into_response(),
            Err(e) => {
                return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], format!("{e}\n"))
                    .into_response();
            }
        }
    } else {
        Principal::dev()
    };
    req.extensions_mut().insert(who);
    next.run(req).await
}

/// A bearer header, else the login cookie.
fn token_in(headers: &HeaderMap) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return value.strip_prefix("Bearer ").map(|t| t.trim().to_string());
    }
    let cookies = headers.get_all(header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
    cookies.flat_map(|v| v.split(';')).find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then(|| value.to_string())
    })
}

/// The host part of a `Host` header or an origin's authority: `[::1]:80` -> `::1`.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, port)| if port.chars().all(|c| c.is_ascii_digit()) { host } else { authority })
}

/// The Host must be an IP address, `localhost`, or a name the operator allowed; a request that
/// changes something must come from a page of this same host (its Origin), if from a page at all.
fn check_host(c: &Coordinator, headers: &HeaderMap, method: &Method) -> Result<(), Error> {
    let host_header = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    let host = host_of(host_header);
    let allowed = host.parse::<std::net::IpAddr>().is_ok()
        || host.eq_ignore_ascii_case("localhost")
        || c.settings.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host));
    if !allowed {
        return Err(Error::PermissionDenied(format!(
            "host `{}` is not one this coordinator answers to (add it with --allowed-host)",
            host.escape_debug()
        )));
    }
    let changes = method != Method::GET && method != Method::HEAD;
    if changes && let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let authority = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if !authority.eq_ignore_ascii_case(host_header) {
            return Err(Error::PermissionDenied(format!("a request from {origin} may not change anything here")));
        }
    }
    Ok(())
}

const LOGIN_PAGE: &str = include_str!("../web/login.html");

pub async fn login_form() -> Html<String> {
    Html(LOGIN_PAGE.replace("{message}", ""))
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    token: String,
    /// Where to go once signed in: a path on this host only (no open redirect).
    #[serde(default)]
    next: String,
}

/// Checks the token and keeps it in an HttpOnly, SameSite=Strict, Secure cookie (auth is served
/// over TLS only, so the browser never sends it in plaintext).
pub async fn login(State(c): State<Arc<Coordinator>>, axum::Form(form): axum::Form<LoginForm>) -> Response {
    let next = local_path(&form.next).unwrap_or("/");
    if !c.settings.auth {
        return Redirect::to(next).into_response();
    }
    // Only secrets the registry accepted pass, and those hold no character a cookie cannot.
    let secret = form.token.trim();
    if c.tokens.authenticate(secret, c.now_ms()).is_err() {
        let page = LOGIN_PAGE.replace("{message}", "<p class=\"error\">That token is not valid.</p>");
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    let cookie = format!("{COOKIE}={secret}; HttpOnly; SameSite=Strict; Secure; Path=/");
    ([(header::SET_COOKIE, cookie)], Redirect::to(next)).into_response()
}

/// `next` if it is a path on this host: one slash, then no second slash or backslash (which
/// browsers read as another host, `//evil` or `/\evil`), and only visible ASCII (a browser
/// drops tabs and newlines, turning `/\t/evil` into `//evil`; a newline would also split the
/// header).
fn local_path(next: &str) -> Option<&str> {
    let mut rest = next.strip_prefix('/')?.chars();
    let visible = next.chars().all(|c| c.is_ascii_graphic());
    let second = rest.next();
    (visible && !next.contains('\\') && second != Some('/')).then_some(next)
}

pub async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Secure; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_read_from_names_addresses_and_ipv6() {
        assert_eq!(host_of("example.org:7080"), "example.org");
        assert_eq!(host_of("127.0.0.1:7080"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7080"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn only_paths_on_this_host_are_followed_after_login() {
        for good in ["/", "/?job=5", "/jobs/7#logs"] {
            assert_eq!(local_path(good), Some(good));
        }
        for bad in ["", "//evil.org", "/\\evil.org", "/\t/evil.org", "/\n/x", "https://evil.org", "evil", "/ a"] {
            assert_eq!(local_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_token_comes_from_the_bearer_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=b; gantry_token=gantry_abc; c=d".parse().unwrap());
        assert_eq!(token_in(&h).as_deref(), Some("gantry_abc"));
        h.insert(header::AUTHORIZATION, "Bearer gantry_xyz".parse().unwrap());
        assert_eq!(token_in(&h).as_deref(), Some("gantry_xyz"));
        assert_eq!(token_in(&HeaderMap::new()), None);
    }
}
