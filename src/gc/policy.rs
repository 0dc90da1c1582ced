//! Retention rules (`gc.retention`): which tags of a repository go, and a read-only preview of
//! the untagged manifests a pass would collect.
//!
//! A repository takes the first rule whose pattern matches its name. Of its tags, those the
//! rule's `tags` regex matches are judged (all when it is absent); tags matching `keep` are
//! never judged (the keep pattern wins). The `keep_last` most recently pushed judged tags stay;
//! of the rest, those pushed longer than `older_than` ago go (all of the rest without
//! `older_than`). A tag is deleted only if it still points where it did when judged. Deleting a
//! tag frees its manifest only with `gc.untagged_manifests: delete`.

use std::collections::HashMap;

use super::{GcError, GcReport};
use crate::auth::access::glob;
use crate::config::RetentionRule;
use crate::meta::{Candidate, CandidateKind, MetaStore, TagInfo};
use crate::metrics::GC;
use crate::registry::names::Digest;

const PAGE: usize = 1000;

/// The tags `rule` deletes from `tags` at `now`.
pub fn judge<'a>(rule: &RetentionRule, tags: &'a [TagInfo], now: u64) -> Vec<&'a TagInfo> {
    let mut judged: Vec<&TagInfo> = tags
        .iter()
        .filter(|t| rule.tags.as_ref().is_none_or(|re| re.is_match(&t.tag)))
        .filter(|t| !rule.keep.as_ref().is_some_and(|re| re.is_match(&t.tag)))
        .collect();
    // Most recent first; ties by name so that the outcome does not depend on listing order.
    judged.sort_by(|a, b| b.updated.cmp(&a.updated).then_with(|| b.tag.cmp(&a.tag)));
    let rest = judged.split_off(rule.keep_last.unwrap_or(0).min(judged.len()));
    match rule.older_than {
        Some(age) => {
            let cutoff = now.saturating_sub(age.as_secs());
            rest.into_iter().filter(|t| t.updated < cutoff).collect()
        }
        None => rest,
    }
}

async fn all_tags(meta: &dyn MetaStore, repo: &str) -> Result<Vec<TagInfo>, GcError> {
    let mut out: Vec<TagInfo> = Vec::new();
    loop {
        let page = meta
            .tag_details(repo, out.last().map(|t| t.tag.as_str()), PAGE)
            .await?;
        let done = page.len() < PAGE;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// Applies the rules to every repository.
pub async fn apply(
    meta: &dyn MetaStore,
    rules: &[RetentionRule],
    now: u64,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    if rules.is_empty() {
        return Ok(());
    }
    let mut last: Option<String> = None;
    loop {
        let repos = meta.repositories(last.as_deref(), PAGE).await?;
        let Some(l) = repos.last() else { break };
        last = Some(l.clone());
        for repo in &repos {
            let Some((i, rule)) = rules
                .iter()
                .enumerate()
                .find(|(_, r)| glob(r.repositories.as_bytes(), repo.as_bytes()))
            else {
                continue;
            };
            let tags = all_tags(meta, repo).await?;
            for t in judge(rule, &tags, now) {
                if dry_run {
                    log::info!(
                        "gc (dry run): would delete tag {repo}:{} ({}): retention rule {i}",
                        t.tag,
                        t.digest
                    );
                    report.tags += 1;
                } else if meta.delete_tag_if(repo, &t.tag, &t.digest).await? {
                    log::info!(
                        "gc: deleted tag {repo}:{} ({}): retention rule {i}",
                        t.tag,
                        t.digest
                    );
                    report.tags += 1;
                    GC.tags_deleted.inc();
                }
            }
        }
    }
    Ok(())
}

/// Dry run of untagged-manifest collection: the due candidates that are untagged, not listed by
/// an index (of any repository: conservative) and not referrers of a live manifest.
pub async fn preview_untagged(
    meta: &dyn MetaStore,
    cutoff: u64,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let due = meta
        .gc_candidates(CandidateKind::Manifest, cutoff, usize::MAX)
        .await?;
    let mut tagged: HashMap<String, Vec<Digest>> = HashMap::new();
    for q in due {
        let Candidate::Manifest { repo, digest } = &q.candidate else {
            continue;
        };
        let Some(record) = meta.manifest(repo, digest).await? else {
            continue;
        };
        if !tagged.contains_key(repo) {
            let digests = all_tags(meta, repo).await?.into_iter().map(|t| t.digest);
            tagged.insert(repo.clone(), digests.collect());
        }
        if tagged[repo].contains(digest) || meta.is_referenced(digest).await? {
            continue;
        }
        if let Some(subject) = &record.subject {
            if meta.manifest(repo, subject).await?.is_some() {
                continue;
            }
        }
        log::info!(
            "gc (dry run): would delete manifest {repo}@{digest} ({} bytes): untagged",
            record.body.len()
        );
        report.manifests.add(record.body.len() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tag(name: &str, updated: u64) -> TagInfo {
        TagInfo {
            tag: name.to_owned(),
            digest: Digest::sha256_of(name.as_bytes()),
            updated,
        }
    }

    fn rule(keep_last: Option<usize>, older_than: Option<u64>) -> RetentionRule {
        RetentionRule {
            repositories: "*".into(),
            tags: None,
            keep_last,
            older_than: older_than.map(Duration::from_secs),
            keep: None,
        }
    }

    fn names(v: Vec<&TagInfo>) -> Vec<&str> {
        let mut n: Vec<&str> = v.into_iter().map(|t| t.tag.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn keep_last_n_keeps_the_most_recent() {
        let tags = [tag("a", 10), tag("b", 30), tag("c", 20), tag("d", 40)];
        assert_eq!(names(judge(&rule(Some(2), None), &tags, 100)), ["a", "c"]);
        assert!(judge(&rule(Some(4), None), &tags, 100).is_empty());
        assert_eq!(judge(&rule(Some(0), None), &tags, 100).len(), 4);
    }

    #[test]
    fn older_than_alone_and_with_keep_last() {
        let tags = [tag("a", 10), tag("b", 30), tag("c", 20), tag("d", 95)];
        // Older than 75 s at t=100: before t=25.
        assert_eq!(names(judge(&rule(None, Some(75)), &tags, 100)), ["a", "c"]);
        // The newest 3 stay whatever their age.
        assert_eq!(names(judge(&rule(Some(3), Some(75)), &tags, 100)), ["a"]);
    }

    #[test]
    fn tag_regex_judges_and_keep_pattern_wins() {
        let tags = [
            tag("v1", 10),
            tag("v2", 20),
            tag("v3", 30),
            tag("latest", 1),
            tag("v0-stable", 5),
        ];
        let mut r = rule(Some(1), None);
        r.tags = Some(regex::Regex::new("^(?:v.*)$").unwrap());
        r.keep = Some(regex::Regex::new("^(?:.*-stable)$").unwrap());
        // latest is not judged; v0-stable is kept; v3 is the newest judged.
        assert_eq!(names(judge(&r, &tags, 100)), ["v1", "v2"]);
    }
}
