//! `endpoints` and `serve update`: the models serve jobs answer for, and moving one to another
//! checkpoint.

use gantry_proto::v1;
use serde::Serialize;

use crate::client::{self, Target, connect};
use crate::output::{ReplicaView, outln, print_json, print_table};

/// One served model: `{"model": "digits-api", "job_id": "4", "from": "3@690", "replicas_wanted": 2,
/// "replicas": [...]}`. Requests go to the coordinator's `/v2/models/MODEL/infer`, or straight
/// to a ready replica's `url`.
#[derive(Serialize)]
struct EndpointView {
    model: String,
    job_id: String,
    from: String,
    replicas_wanted: u32,
    replicas: Vec<ReplicaView>,
}

pub async fn list(url: &Target, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let endpoints = c.list_endpoints(v1::ListEndpointsRequest {}).await.map_err(client::status)?.into_inner().endpoints;
    let views: Vec<EndpointView> = endpoints
        .iter()
        .map(|e| EndpointView {
            model: e.model.clone(),
            job_id: e.job_id.clone(),
            from: e.from.clone(),
            replicas_wanted: e.replicas_wanted,
            replicas: e.replicas.iter().map(ReplicaView::from).collect(),
        })
        .collect();
    if json {
        return print_json(&views);
    }
    let mut rows = Vec::new();
    for e in &views {
        let ready = e.replicas.iter().filter(|r| r.state == "ready").count();
        let path = format!("/v2/models/{}/infer", e.model);
        rows.push(vec![
            e.model.clone(),
            e.job_id.clone(),
            e.from.clone(),
            format!("{ready}/{}", e.replicas_wanted),
            path,
        ]);
        for r in &e.replicas {
            let at = if r.url.is_empty() { r.state.clone() } else { format!("{} {}", r.state, r.url) };
            rows.push(vec![String::new(), format!("  {}", r.job_id), r.from.clone(), r.node.clone(), at]);
        }
    }
    print_table(&["MODEL", "JOB", "FROM", "READY", "URL"], &rows)?;
    Ok(())
}

/// Serves model `name` from another checkpoint: its spec again with `serve.from` changed,
/// which replaces the replicas one at a time.
pub async fn update(url: &Target, name: &str, from: &str, json: bool) -> anyhow::Result<()> {
    let mut c = connect(url).await?;
    let endpoints = c.list_endpoints(v1::ListEndpointsRequest {}).await.map_err(client::status)?.into_inner().endpoints;
    let Some(endpoint) = endpoints.iter().find(|e| e.model == name) else {
        anyhow::bail!("no model named {name} is served (`gantry endpoints` lists them)");
    };
    let job =
        c.get_job(v1::GetJobRequest { job_id: endpoint.job_id.clone() }).await.map_err(client::status)?.into_inner();
    let mut spec = job.spec.ok_or_else(|| anyhow::anyhow!("job {} came without its spec", endpoint.job_id))?;
    match spec.workload.as_mut() {
        Some(v1::job_spec::Workload::Serve(serve)) => serve.from = from.to_string(),
        _ => anyhow::bail!("job {} is not a serve job", endpoint.job_id),
    }
    let reply = c.submit(v1::SubmitRequest { spec: Some(spec) }).await.map_err(client::status)?.into_inner();
    if json {
        return print_json(&serde_json::json!({ "model": name, "job_id": reply.job_id, "from": from }));
    }
    outln!("model {name} (job {}): replicas are replaced one at a time to serve {from}", reply.job_id)?;
    Ok(())
}
