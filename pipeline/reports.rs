//! Fetching a task's RESULTS and ERRORS reports.
//!
//! Links are pre-signed URLs of unknown lifetime: list both report types page
//! by page, download every link at once, persist the files, and never keep a
//! URL. A finished task with no links yet is listed again with backoff; a
//! refused download (expired link) triggers a fresh listing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_iot::types::ReportType;

use crate::aws::{describe, Aws};
use crate::error::{Error, Result};
use crate::workspace::{sync_dir, write_durable};

async fn list_links(aws: &Aws, task_id: &str, kind: ReportType) -> Result<Vec<String>> {
    let mut links = Vec::new();
    let mut token = None;
    loop {
        let out = aws
            .iot
            .list_thing_registration_task_reports()
            .task_id(task_id)
            .report_type(kind.clone())
            .max_results(250)
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| {
                Error::infra(format!(
                    "listing {} reports of task {task_id}: {}",
                    kind.as_str(),
                    describe(&e)
                ))
            })?;
        links.extend(out.resource_links().iter().cloned());
        token = out.next_token().map(String::from);
        if token.is_none() {
            return Ok(links);
        }
    }
}

async fn download(http: &reqwest::Client, url: &str) -> std::result::Result<Vec<u8>, (Option<u16>, String)> {
    let resp = http.get(url).send().await.map_err(|e| (None, e.to_string()))?;
    let status = resp.status();
    if !status.is_success() {
        return Err((Some(status.as_u16()), format!("HTTP {status}")));
    }
    resp.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| (None, e.to_string()))
}

/// Downloads every report file of a finished task into `dir`.
pub async fn fetch_all(aws: &Aws, task_id: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::infra(format!("{}: {e}", dir.display())))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| Error::Other(e.into()))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    for (kind, stem) in [(ReportType::Results, "results"), (ReportType::Errors, "errors")] {
        let mut relists = 0;
        'listing: loop {
            let links = list_links(aws, task_id, kind.clone()).await?;
            let mut files = Vec::new();
            for url in &links {
                match download(&http, url).await {
                    Ok(bytes) => files.push(bytes),
                    Err((Some(403), _)) | Err((Some(400), _)) if relists < 3 => {
                        tracing::info!(
                            task_id,
                            report = stem,
                            "a report link was refused (expired?); listing again for fresh links"
                        );
                        relists += 1;
                        continue 'listing;
                    }
                    Err((_, e)) => {
                        return Err(Error::infra(format!(
                            "downloading a {stem} report of task {task_id}: {e}"
                        )));
                    }
                }
            }
            // Links for the RESULTS of a task that produced none may never
            // come; wait a while only for the first report type.
            if links.is_empty() && stem == "results" && Instant::now() < deadline && relists < 1 {
                relists += 1;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue 'listing;
            }
            // One file per report type, in link order: one fsync, not one per link.
            let mut all = Vec::with_capacity(files.iter().map(Vec::len).sum::<usize>() + files.len());
            for bytes in &files {
                all.extend_from_slice(bytes);
                if !bytes.is_empty() && !bytes.ends_with(b"\n") {
                    all.push(b'\n');
                }
            }
            let p = dir.join(format!("{stem}-0000.jsonl"));
            write_durable(&p, &all, 0o600).map_err(|e| Error::infra(format!("{}: {e}", p.display())))?;
            tracing::debug!(task_id, report = stem, files = files.len(), "reports saved");
            break;
        }
    }
    sync_dir(dir).map_err(|e| Error::infra(format!("{}: {e}", dir.display())))
}

/// The lines of every saved report file: (RESULTS, ERRORS).
pub fn read_saved(dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::infra(format!("{}: {e}", dir.display()))),
    };
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let target = if name.starts_with("results-") {
            &mut results
        } else if name.starts_with("errors-") {
            &mut errors
        } else {
            continue;
        };
        let text = std::fs::read_to_string(&p).map_err(|e| Error::infra(format!("{}: {e}", p.display())))?;
        target.extend(text.lines().map(String::from));
    }
    Ok((results, errors))
}
