//! Pages of the `tasks` listing, so that no answer exceeds a fixed size.
//!
//! A page holds the tasks after the cursor in task id order (UUIDv7: creation order),
//! at most `limit` of them (at most [`MAX_TASKS_PAGE`]), and stops growing once its
//! views exceed [`MAX_PAGE_BYTES`] (it always holds at least one task). The cursor is
//! the last task id of the page, so a task that changes state between two pages is
//! listed exactly once, and no task that exists throughout is missed.

use std::borrow::Cow;

use agentd_core::{Task, TaskId};
use agentd_proto::control::{
    ErrorBody, ErrorCode, TaskView, TasksPage, MAX_PAGE_BYTES, MAX_TASKS_PAGE,
};
use agentd_proto::text;

use crate::views;

/// One page of `tasks` (the ones in `session`, if given), after `cursor`.
pub fn page<'a>(
    tasks: impl Iterator<Item = Cow<'a, Task>>,
    position: impl Fn(&TaskId) -> Option<u32>,
    session: Option<&str>,
    limit: Option<u32>,
    cursor: Option<&str>,
) -> Result<TasksPage, ErrorBody> {
    let after = parse_cursor(cursor)?;
    let limit = page_limit(limit);
    let candidates = first_by_id(tasks, session, after, limit + 1);
    let views = candidates
        .iter()
        .map(|task| views::task_view(task, position(&task.id)))
        .collect();
    Ok(page_of_views(views, limit))
}

/// The cursor of a `tasks` request as a task id.
pub fn parse_cursor(cursor: Option<&str>) -> Result<Option<TaskId>, ErrorBody> {
    cursor
        .map(|text| {
            TaskId::parse_str(text.trim())
                .map_err(|_| ErrorBody::new(ErrorCode::BadRequest, text::invalid_cursor(text)))
        })
        .transpose()
}

/// A request's `limit` within 1..=[`MAX_TASKS_PAGE`].
pub fn page_limit(limit: Option<u32>) -> usize {
    limit.unwrap_or(MAX_TASKS_PAGE).clamp(1, MAX_TASKS_PAGE) as usize
}

/// The first `n` of `tasks` (of `session`, after `after`) in task id order, without
/// sorting them all.
pub fn first_by_id<'a>(
    tasks: impl Iterator<Item = Cow<'a, Task>>,
    session: Option<&str>,
    after: Option<TaskId>,
    n: usize,
) -> Vec<Cow<'a, Task>> {
    let mut candidates: Vec<Cow<'a, Task>> = tasks
        .filter(|t| session.is_none_or(|s| t.session == s))
        .filter(|t| after.is_none_or(|after| t.id > after))
        .collect();
    if candidates.len() > n {
        candidates.select_nth_unstable_by_key(n, |t| t.id);
        candidates.truncate(n);
    }
    candidates.sort_unstable_by_key(|t| t.id);
    candidates
}

/// A page of at most `limit` of `candidates` (views in task id order; any past
/// `limit` only say that more follow), cut short past [`MAX_PAGE_BYTES`].
pub fn page_of_views(candidates: Vec<TaskView>, limit: usize) -> TasksPage {
    let total = candidates.len();
    let mut page = TasksPage {
        tasks: Vec::new(),
        next_cursor: None,
    };
    let mut bytes = 0;
    for view in candidates {
        if page.tasks.len() == limit {
            break;
        }
        let size = view_size(&view);
        if !page.tasks.is_empty() && bytes + size > MAX_PAGE_BYTES {
            break;
        }
        bytes += size;
        page.tasks.push(view);
    }
    if page.tasks.len() < total {
        page.next_cursor = page.tasks.last().map(|v| v.task_id.clone());
    }
    page
}

/// For a `tasks` request without `limit` and `cursor`: the whole listing if it fits
/// in one page, else `too_large`.
pub fn whole(listing: Vec<TaskView>) -> Result<Vec<TaskView>, ErrorBody> {
    let bytes: usize = listing.iter().map(view_size).sum();
    if listing.len() > MAX_TASKS_PAGE as usize || (listing.len() > 1 && bytes > MAX_PAGE_BYTES) {
        return Err(too_large());
    }
    Ok(listing)
}

/// The `too_large` refusal of an unpaged listing.
pub fn too_large() -> ErrorBody {
    ErrorBody::new(
        ErrorCode::TooLarge,
        text::listing_too_large(MAX_TASKS_PAGE, MAX_PAGE_BYTES),
    )
}

fn view_size(view: &TaskView) -> usize {
    serde_json::to_vec(view).map_or(0, |v| v.len() + 1)
}

/// For a `tasks` request without `limit` and `cursor`: `Ok` when the whole listing
/// fits in one page, else `too_large`.
pub fn check_fits<'a>(
    tasks: impl Iterator<Item = Cow<'a, Task>>,
    position: impl Fn(&TaskId) -> Option<u32>,
    session: Option<&str>,
) -> Result<(), ErrorBody> {
    let first = page(tasks, position, session, None, None)?;
    match first.next_cursor {
        None => Ok(()),
        Some(_) => Err(too_large()),
    }
}
