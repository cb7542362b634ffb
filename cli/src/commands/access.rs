//! `token create|list|revoke` and `login`: who may use the coordinator.

use std::time::Duration;

use gantry_proto::v1;

use crate::client::{self, Login, Target, connect};
use crate::output::{outln, print_json, print_table};

fn role(text: &str) -> anyhow::Result<v1::Role> {
    match text {
        "admin" => Ok(v1::Role::Admin),
        "user" => Ok(v1::Role::User),
        "viewer" => Ok(v1::Role::Viewer),
        "agent" => Ok(v1::Role::Agent),
        _ => anyhow::bail!("role `{text}`: expected admin, user, viewer or agent"),
    }
}

fn role_name(role: i32) -> &'static str {
    match v1::Role::try_from(role).unwrap_or(v1::Role::Unspecified) {
        v1::Role::Admin => "admin",
        v1::Role::User => "user",
        v1::Role::Viewer => "viewer",
        v1::Role::Agent => "agent",
        v1::Role::Unspecified => "unknown",
    }
}

/// Prints the secret alone on a line (or as JSON): the only time anyone sees it.
pub async fn create(
    target: &Target,
    name: &str,
    role_text: &str,
    ttl: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let request = v1::CreateTokenRequest {
        name: name.to_string(),
        role: role(role_text)? as i32,
        ttl_seconds: ttl.map(|t| t.as_secs()),
    };
    let mut c = connect(target).await?;
    let reply = c.create_token(request).await.map_err(client::status)?.into_inner();
    if json {
        let t = reply.token.unwrap_or_default();
        return print_json(&serde_json::json!({
            "name": t.name, "role": role_name(t.role), "secret": reply.secret, "expires_at_ms": t.expires_at_ms,
        }));
    }
    outln!("{}", reply.secret)?;
    Ok(())
}

pub async fn list(target: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    let tokens = c.list_tokens(v1::ListTokensRequest {}).await.map_err(client::status)?.into_inner().tokens;
    let views: Vec<serde_json::Value> = tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "role": role_name(t.role), "created_at_ms": t.created_at_ms,
                "expires_at_ms": t.expires_at_ms,
            })
        })
        .collect();
    if json {
        return print_json(&views);
    }
    let when = |ms: i64| crate::output::timestamp(ms);
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                role_name(t.role).to_string(),
                when(t.created_at_ms),
                t.expires_at_ms.map_or("never".to_string(), when),
            ]
        })
        .collect();
    print_table(&["NAME", "ROLE", "CREATED", "EXPIRES"], &rows)?;
    Ok(())
}

pub async fn revoke(target: &Target, name: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(target).await?;
    c.revoke_token(v1::RevokeTokenRequest { name: name.to_string() }).await.map_err(client::status)?;
    if json {
        return print_json(&serde_json::json!({ "revoked": name }));
    }
    outln!("token {name} revoked")?;
    Ok(())
}

/// Checks the token against the coordinator, then keeps both in the login file (mode 0600).
pub async fn login(url: &str, token: &str, ca: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let ca_pem = ca.map(client::read_ca).transpose()?;
    let target = Target { urls: url.to_string(), token: Some(token.to_string()), ca_pem: ca_pem.clone() };
    let mut c = connect(&target).await?;
    let me = c.who_am_i(v1::WhoAmIRequest {}).await.map_err(client::status)?.into_inner();
    let path = client::login_file().ok_or_else(|| anyhow::anyhow!("no HOME: cannot keep the login"))?;
    let dir = path.parent().expect("the login file is in a directory");
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let login = Login { coordinator: url.to_string(), token: token.to_string(), ca: ca_pem };
    // Readable by its owner only from the start, as the coordinator's admin-token file is.
    gantry_coordinator::auth::tokens::write_private(&path, &serde_json::to_string_pretty(&login)?)?;
    if json {
        return print_json(&serde_json::json!({
            "coordinator": url, "name": me.name, "role": role_name(me.role), "file": path,
        }));
    }
    outln!("logged in to {url} as {} ({}); kept in {}", me.name, role_name(me.role), path.display())?;
    Ok(())
}
