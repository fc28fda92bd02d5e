//! Pages of the `tasks` listing, so that no answer exceeds a fixed size.
//!
//! A page holds the tasks after the cursor in task id order (UUIDv7: creation order),
//! at most `limit` of them (at most [`MAX_TASKS_PAGE`]), and stops growing once its
//! views exceed [`MAX_PAGE_BYTES`] (it always holds at least one task). The cursor is
//! the last task id of the page, so a task that changes state between two pages is
//! listed exactly once, and no task that exists throughout is missed.

use std::borrow::Cow;

use agentd_core::{Task, TaskId};
use agentd_proto::control::{ErrorBody, ErrorCode, TasksPage, MAX_PAGE_BYTES, MAX_TASKS_PAGE};
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
    let after = match cursor {
        Some(text) => Some(
            TaskId::parse_str(text.trim())
                .map_err(|_| ErrorBody::new(ErrorCode::BadRequest, text::invalid_cursor(text)))?,
        ),
        None => None,
    };
    let limit = limit.unwrap_or(MAX_TASKS_PAGE).clamp(1, MAX_TASKS_PAGE) as usize;
    let mut candidates: Vec<Cow<'a, Task>> = tasks
        .filter(|t| session.is_none_or(|s| t.session == s))
        .filter(|t| after.is_none_or(|after| t.id > after))
        .collect();
    // Only the first `limit + 1` by id matter (the extra one says whether more follow).
    if candidates.len() > limit + 1 {
        candidates.select_nth_unstable_by_key(limit, |t| t.id);
        candidates.truncate(limit + 1);
    }
    candidates.sort_unstable_by_key(|t| t.id);
    let mut page = TasksPage {
        tasks: Vec::new(),
        next_cursor: None,
    };
    let mut bytes = 0;
    for task in &candidates {
        if page.tasks.len() == limit {
            break;
        }
        let view = views::task_view(task, position(&task.id));
        let size = serde_json::to_vec(&view).map_or(0, |v| v.len() + 1);
        if !page.tasks.is_empty() && bytes + size > MAX_PAGE_BYTES {
            break;
        }
        bytes += size;
        page.tasks.push(view);
    }
    if page.tasks.len() < candidates.len() {
        page.next_cursor = page.tasks.last().map(|v| v.task_id.clone());
    }
    Ok(page)
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
        Some(_) => Err(ErrorBody::new(
            ErrorCode::TooLarge,
            text::listing_too_large(MAX_TASKS_PAGE, MAX_PAGE_BYTES),
        )),
    }
}
