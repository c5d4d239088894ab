// wingman-edge patch (see PATCHED.md): a response body held back by
// `response_body_filter` is written downstream chunk by chunk, from an async hook.

use super::*;

impl<SV, C> HttpProxy<SV, C>
where
    C: custom::Connector,
{
    /// Writes `tasks` downstream like [`Session::write_response_tasks`]; before each
    /// body end, trailer or body task, first writes every chunk that
    /// [`ProxyHttp::response_body_backlog`] hands out while
    /// [`ProxyHttp::has_response_body_backlog`] says there is some.
    pub(crate) async fn write_response_tasks_with_backlog(
        &self,
        session: &mut Session,
        tasks: Vec<HttpTask>,
        ctx: &mut SV::CTX,
    ) -> Result<bool>
    where
        SV: ProxyHttp + Send + Sync,
        SV::CTX: Send + Sync,
    {
        if !self.inner.has_response_body_backlog(ctx) {
            return session.write_response_tasks(tasks).await;
        }
        let mut batch = Vec::with_capacity(tasks.len());
        let mut done = false;
        for task in tasks {
            let end = match &task {
                HttpTask::Body(_, end) => Some(*end),
                HttpTask::Trailer(_) | HttpTask::Done => Some(true),
                _ => None,
            };
            if let Some(end) = end {
                while self.inner.has_response_body_backlog(ctx) {
                    let Some(chunk) = self.inner.response_body_backlog(session, end, ctx).await?
                    else {
                        break;
                    };
                    batch.push(HttpTask::Body(Some(chunk), false));
                    done |= session.write_response_tasks(std::mem::take(&mut batch)).await?;
                }
            }
            batch.push(task);
        }
        if !batch.is_empty() {
            done |= session.write_response_tasks(batch).await?;
        }
        Ok(done)
    }
}
