//! `gantry top`: a live terminal view of the fleet and the queue, like nvtop for a whole fleet.

use std::time::{Duration, Instant};

use gantry_proto::v1;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

use crate::client::{self, Target, connect};
use crate::output::{self, bytes};

struct Snapshot {
    gpus: Vec<v1::Gpu>,
    nodes: Vec<v1::Node>,
    jobs: Vec<v1::Job>,
    error: Option<String>,
    at: Instant,
}

async fn fetch(url: &Target) -> anyhow::Result<(Vec<v1::Gpu>, Vec<v1::Node>, Vec<v1::Job>)> {
    let mut c = connect(url).await?;
    let gpus = c.list_gpus(v1::ListGpusRequest {}).await.map_err(client::status)?.into_inner().gpus;
    let nodes = c.list_nodes(v1::ListNodesRequest {}).await.map_err(client::status)?.into_inner().nodes;
    // In the coordinator's order: the queue as it will run, then running jobs, then the rest.
    let jobs = c.list_jobs(v1::ListJobsRequest {}).await.map_err(client::status)?.into_inner().jobs;
    Ok((gpus, nodes, jobs))
}

/// Runs until `q`, Esc or Ctrl-C.
pub fn run(url: &Target, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    // Fail before taking over the terminal if the coordinator is not there.
    let first = runtime.block_on(fetch(url))?;
    let mut snap = Snapshot { gpus: first.0, nodes: first.1, jobs: first.2, error: None, at: Instant::now() };
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        loop {
            terminal.draw(|f| draw(f, url, &snap))?;
            if event::poll(Duration::from_millis(250))?
                && let Event::Key(k) = event::read()?
            {
                let ctrl_c = k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
            if snap.at.elapsed() >= Duration::from_secs(1) {
                match runtime.block_on(fetch(url)) {
                    Ok((gpus, nodes, jobs)) => snap = Snapshot { gpus, nodes, jobs, error: None, at: Instant::now() },
                    Err(e) => {
                        snap.error = Some(client::one_line(&e));
                        snap.at = Instant::now();
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

fn draw(f: &mut ratatui::Frame, url: &Target, s: &Snapshot) {
    let [head, gpus, jobs] =
        Layout::vertical([Constraint::Length(2), Constraint::Percentage(50), Constraint::Fill(1)]).areas(f.area());
    let ready = s.nodes.iter().filter(|n| n.connected && !n.drained).count();
    let queued = s.jobs.iter().filter(|j| output::state(j) == "queued").count();
    let running = s.jobs.iter().filter(|j| output::state(j) == "running").count();
    let mut title = format!(
        "gantry top  {}  nodes {ready}/{} ready  GPUs {}  jobs: {running} running, {queued} queued  (q to quit)",
        url.urls,
        s.nodes.len(),
        s.gpus.len()
    );
    if let Some(e) = &s.error {
        title += &format!("  [{e}]");
    }
    f.render_widget(Paragraph::new(Line::from(title).style(Style::new().add_modifier(Modifier::BOLD))), head);

    let gpu_rows: Vec<Row> = s
        .gpus
        .iter()
        .map(|g| {
            let i = g.info.clone().unwrap_or_default();
            let util = i.utilization_percent.map(|u| format!("{:<10} {u:>3}%", "#".repeat((u as usize).div_ceil(10))));
            let health = if i.healthy {
                Cell::from("ok")
            } else {
                Cell::from(format!("UNHEALTHY {}", i.health_reason)).style(Style::new().fg(Color::Red))
            };
            Row::new(vec![
                Cell::from(g.node.clone()),
                Cell::from(i.index.to_string()),
                Cell::from(i.name.clone()),
                Cell::from(util.unwrap_or_else(|| "-".into())),
                Cell::from(format!(
                    "{}/{}",
                    i.memory_used_bytes.map(bytes).unwrap_or_else(|| "-".into()),
                    bytes(i.memory_total_bytes)
                )),
                Cell::from(i.temperature_c.map(|t| format!("{t}C")).unwrap_or_else(|| "-".into())),
                Cell::from(i.power_mw.map(|p| format!("{:.0}W", p as f64 / 1000.0)).unwrap_or_else(|| "-".into())),
                health,
                Cell::from(g.job_id.clone()),
                Cell::from(i.uuid.clone()),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(12),
        Constraint::Length(3),
        Constraint::Length(24),
        Constraint::Length(16),
        Constraint::Length(20),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Fill(1),
    ];
    let header = Row::new(["NODE", "GPU", "MODEL", "UTIL", "MEMORY", "TEMP", "POWER", "HEALTH", "JOB", "UUID"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    f.render_widget(Table::new(gpu_rows, widths).header(header).block(Block::bordered().title(" GPUs ")), gpus);

    let job_rows: Vec<Row> = s
        .jobs
        .iter()
        .map(|j| {
            let reason = if !j.pending_reason.is_empty() {
                j.pending_reason.clone()
            } else if !j.stop_reason.is_empty() {
                format!("stopping: {}", j.stop_reason)
            } else {
                j.message.clone()
            };
            Row::new(vec![
                j.id.clone(),
                j.name.clone(),
                output::state(j).to_string(),
                j.attempt.to_string(),
                j.spec.as_ref().map(|s| s.queue.clone()).unwrap_or_default(),
                if j.queue_position > 0 { j.queue_position.to_string() } else { String::new() },
                reason,
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(6),
        Constraint::Length(18),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Fill(1),
    ];
    let header = Row::new(["ID", "NAME", "STATE", "ATTEMPT", "QUEUE", "POS", "REASON"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    f.render_widget(Table::new(job_rows, widths).header(header).block(Block::bordered().title(" Jobs ")), jobs);
}
