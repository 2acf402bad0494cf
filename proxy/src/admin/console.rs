//! The console: server-rendered pages on the admin listener for the people who approve and pay,
//! under `/console`. One page shows the pending approvals with their risk (approve or deny with
//! a reason), spend this period by cost center, project and agent against each budget, the
//! autonomy ratio, and the disabled agents (re-enable). Every figure comes from the same
//! functions as the admin API's JSON endpoints (`/admin/approvals`, `/admin/budgets`,
//! `/admin/usage`, `/admin/oversight`, `/admin/agents/{agent}/enable`).
//!
//! - `GET  /console`                  the page (signed out: `303` to the sign-in form)
//! - `GET  /console/sign-in`          the sign-in form: the person's name and the admin token
//! - `POST /console/sign-in`          `401` page for a wrong token; else a session cookie, `303`
//! - `POST /console/sign-out`
//! - `POST /console/approvals/decide` `id`, `decision=approve|deny`, `reason`
//! - `POST /console/agents/enable`    `agent`
//! - `GET  /console/console.css`      the style sheet, embedded in the binary
//!
//! Security: the admin token is only ever posted in a form body (never in a URL) and compared
//! in constant time; the session lives in memory ([`session`]) behind an `HttpOnly`,
//! `SameSite=Strict` cookie (`Secure` when reached over TLS); every `POST` must come from the
//! console's own origin (`Origin`, or `Referer` when a browser sends no `Origin`) and every
//! state-changing one must carry the session's CSRF token; every value is HTML-escaped
//! ([`html::esc`]); pages are sent with a content security policy that allows no script and no
//! framing, and `Cache-Control: no-store`.

mod html;
mod session;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, HOST, LOCATION, ORIGIN, REFERER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use tollgate_core::approval::{Approval, State};
use tollgate_core::budget::{BudgetStatus, Scope};
use tollgate_core::risk::Dimension;
use tollgate_core::time::UnixMillis;

use self::html::{esc, page};
pub use self::session::Sessions;
use self::session::{clear_cookie, cookie_id, set_cookie, Session};
use super::oversight::{approvals, autonomy, decide_approval, enable_agent, Undecided};
use super::{
    budget_states, constant_time_eq, this_month, usage_totals, Failure, Totals, UsageGroup,
};
use crate::deny::full;
use crate::oversight::Counts;
use crate::state::Shared;
use crate::upstream::Body;

/// The style sheet, compiled into the binary.
const CSS: &str = include_str!("console/console.css");

/// Largest form body accepted.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// Answers a request under `/console`.
pub(super) async fn handle(
    shared: &Arc<Shared>,
    sessions: &Sessions,
    req: Request<Incoming>,
) -> Response<Body> {
    let secure = over_tls(&req);
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if method == Method::GET && path == "/console/console.css" {
        let mut r = Response::new(full(Bytes::from_static(CSS.as_bytes())));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8"));
        r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
        return r;
    }
    let now = Instant::now();
    let signed_in =
        cookie_id(req.headers()).and_then(|id| sessions.get(&id, now).map(|session| (id, session)));
    match (method, path.as_str()) {
        (Method::GET, "/console" | "/console/") => match signed_in {
            Some((id, session)) => {
                let flash = sessions.take_flash(&id);
                match dashboard(shared, &session, flash.as_deref()).await {
                    Ok(body) => html_response(StatusCode::OK, page("Console", &body)),
                    Err(failure) => error_page(failure.status, failure.message),
                }
            }
            None => redirect("/console/sign-in"),
        },
        (Method::GET, "/console/sign-in") => match signed_in {
            Some(_) => redirect("/console"),
            None => sign_in_page(StatusCode::OK, None),
        },
        (Method::POST, path) => {
            if !same_origin(&req, secure) {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "This form was not sent from the console's own page (Origin check).",
                );
            }
            let path = path.to_string();
            let form = match read_form(req).await {
                Ok(form) => form,
                Err(status) => return error_page(status, "The form could not be read."),
            };
            if path == "/console/sign-in" {
                let answer = sign_in(shared, sessions, &form, secure, now);
                // A new sign-in replaces the browser's session, if it had one.
                if let (Some((old, _)), true) = (&signed_in, answer.status().is_redirection()) {
                    sessions.remove(old);
                }
                return answer;
            }
            let Some((id, session)) = signed_in else { return redirect("/console/sign-in") };
            let given = form.get("csrf").map(String::as_str).unwrap_or("");
            if !constant_time_eq(given.as_bytes(), session.csrf.as_bytes()) {
                return error_page(
                    StatusCode::FORBIDDEN,
                    "This form carries no valid CSRF token: reload the console and try again.",
                );
            }
            match path.as_str() {
                "/console/sign-out" => {
                    sessions.remove(&id);
                    let mut r = redirect("/console/sign-in");
                    put_cookie(&mut r, &clear_cookie(secure));
                    r
                }
                "/console/approvals/decide" => {
                    let message = decide(shared, &session, &form).await;
                    sessions.flash(&id, message);
                    redirect("/console")
                }
                "/console/agents/enable" => {
                    let agent = form.get("agent").map(String::as_str).unwrap_or("");
                    let message = match enable_agent(shared, agent, &session.name).await {
                        Ok(true) => format!("{agent} is enabled again."),
                        Ok(false) => format!("{agent} was not disabled."),
                        Err(e) => e,
                    };
                    sessions.flash(&id, message);
                    redirect("/console")
                }
                _ => error_page(StatusCode::NOT_FOUND, "There is no such page in the console."),
            }
        }
        _ => error_page(StatusCode::NOT_FOUND, "There is no such page in the console."),
    }
}

/// Whether the request reached the console over TLS: an `https` request URI, or a
/// TLS-terminating proxy in front that says so with `X-Forwarded-Proto: https` (the admin
/// listener itself speaks plain HTTP).
fn over_tls<B>(req: &Request<B>) -> bool {
    req.uri().scheme_str() == Some("https")
        || req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// Whether a `POST` comes from a page of the console's own origin: its `Origin` (or, when a
/// browser sends none, its `Referer`) names the scheme and host the request was sent to.
fn same_origin<B>(req: &Request<B>, secure: bool) -> bool {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()));
    let Some(host) = host else { return false };
    let expected = format!("{}://{host}", if secure { "https" } else { "http" });
    let header = |name| req.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    match (header(ORIGIN), header(REFERER)) {
        (Some(origin), _) => origin.eq_ignore_ascii_case(&expected),
        (None, Some(referer)) => referer
            .get(..expected.len() + 1)
            .is_some_and(|head| head.eq_ignore_ascii_case(&format!("{expected}/"))),
        (None, None) => false,
    }
}

/// The form fields of a `application/x-www-form-urlencoded` body (the last of a repeated name).
async fn read_form(req: Request<Incoming>) -> Result<BTreeMap<String, String>, StatusCode> {
    let body = match Limited::new(req.into_body(), MAX_FORM_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(StatusCode::PAYLOAD_TOO_LARGE),
    };
    Ok(form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
}

/// Checks the name and the admin token, opens a session and sets its cookie.
fn sign_in(
    shared: &Shared,
    sessions: &Sessions,
    form: &BTreeMap<String, String>,
    secure: bool,
    now: Instant,
) -> Response<Body> {
    let Some(expected) = &shared.admin_token else {
        return sign_in_page(
            StatusCode::UNAUTHORIZED,
            Some("The console is closed: no admin token is set (see admin.token_env)."),
        );
    };
    let token = form.get("token").map(String::as_str).unwrap_or("");
    if !constant_time_eq(token.as_bytes(), expected.as_bytes()) {
        tracing::warn!("console sign-in with a wrong admin token");
        return sign_in_page(
            StatusCode::UNAUTHORIZED,
            Some("Wrong admin token: you are not signed in. Use the admin API's token (admin.token_env)."),
        );
    }
    let name = form.get("name").map(|n| n.trim()).unwrap_or("");
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return sign_in_page(
            StatusCode::BAD_REQUEST,
            Some("Give your name (1 to 128 characters): the audit log records who decided."),
        );
    }
    match sessions.create(name, now) {
        Ok((id, _)) => {
            tracing::info!(name = %name, "console sign-in");
            let mut r = redirect("/console");
            put_cookie(&mut r, &set_cookie(&id, secure));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "no random bytes for a console session");
            error_page(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// Applies an approve or deny form; the message for the next page.
async fn decide(
    shared: &Arc<Shared>,
    session: &Session,
    form: &BTreeMap<String, String>,
) -> String {
    let id = form.get("id").map(String::as_str).unwrap_or("");
    let approve = match form.get("decision").map(String::as_str) {
        Some("approve") => true,
        Some("deny") => false,
        _ => return "Choose approve or deny.".into(),
    };
    let reason = form.get("reason").map(|r| r.trim()).filter(|r| !r.is_empty());
    let Some(reason) = reason else {
        return format!("Give a reason to {} {id}.", if approve { "approve" } else { "deny" });
    };
    match decide_approval(shared, id, approve, &session.name, Some(reason)).await {
        Ok(a) => format!("{} {} ({} → {}).", a.id, a.state, a.agent, a.action),
        Err(Undecided::Unknown) => format!("There is no approval {id}."),
        Err(Undecided::NotPending(why)) => format!("{id} was not changed: {why}."),
        Err(Undecided::Failed) => format!("{id} could not be decided: the journal failed."),
    }
}

/// The console's one page, for `session`.
async fn dashboard(
    shared: &Arc<Shared>,
    session: &Session,
    flash: Option<&str>,
) -> Result<String, Failure> {
    let csrf = &session.csrf;
    let mut out = String::new();
    let _ = write!(
        out,
        "<header><h1>Tollgate console</h1><div class=\"who\">Signed in as \
         <strong id=\"who\">{}</strong>\
         <form method=\"post\" action=\"/console/sign-out\">{}\
         <button type=\"submit\" class=\"quiet\">Sign out</button></form></div></header>\n<main>\n",
        esc(&session.name),
        csrf_field(csrf)
    );
    if let Some(message) = flash {
        let _ = writeln!(out, "<p class=\"flash\" id=\"flash\">{}</p>", esc(message));
    }
    let pending = approvals(shared, Some(State::Pending)).await;
    approvals_section(&mut out, &pending, csrf);
    let period = this_month();
    let (_, budgets) = budget_states(shared)?;
    let [cost_centers, projects, agents] = usage_totals(
        shared,
        &period,
        [UsageGroup::CostCenter, UsageGroup::Project, UsageGroup::Agent],
    )
    .await?;
    spend_section(&mut out, &period, &budgets, [&cost_centers, &projects, &agents]);
    let (overall, by) = autonomy(shared);
    autonomy_section(&mut out, &overall, &by);
    agents_section(&mut out, &shared.oversight.disabled_agents(), csrf);
    out.push_str("</main>");
    Ok(out)
}

fn csrf_field(csrf: &str) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(csrf))
}

fn approvals_section(out: &mut String, pending: &[Approval], csrf: &str) {
    let _ = writeln!(
        out,
        "<section id=\"approvals\"><h2>Pending approvals <span class=\"count\">{}</span></h2>",
        pending.len()
    );
    if pending.is_empty() {
        out.push_str("<p class=\"empty\">Nothing is waiting for a human.</p>");
    }
    for a in pending {
        let score = tollgate_core::risk::Score(a.risk_score);
        let timeout = match a.on_timeout {
            tollgate_core::risk::OnTimeout::Approve => "approved",
            tollgate_core::risk::OnTimeout::Deny => "denied",
        };
        let _ = write!(
            out,
            "<article class=\"approval\" data-id=\"{id}\">\
             <h3><span class=\"band band-{band}\">risk {score} · {band}</span> \
             <span class=\"agent\">{agent}</span> wants <code>{action}</code></h3>\
             <dl><dt>Approval</dt><dd><code>{id}</code></dd>\
             <dt>Why</dt><dd><code>{reason}</code></dd>\
             <dt>Cost center</dt><dd>{cc}</dd><dt>Project</dt><dd>{project}</dd>\
             <dt>Route</dt><dd>{route}</dd>\
             <dt>Asked</dt><dd>{created}</dd>\
             <dt>Unanswered</dt><dd>{timeout} at {expires}</dd></dl>",
            id = esc(&a.id),
            band = esc(&a.risk_band),
            agent = esc(&a.agent),
            action = esc(&a.action),
            reason = esc(&a.reason),
            cc = esc(&a.cost_center),
            project = esc(&a.project),
            route = esc(&a.route),
            created = UnixMillis(a.created_at_ms),
            expires = UnixMillis(a.expires_at_ms),
        );
        let parts = risk_parts(&a.explanation);
        if !parts.is_empty() {
            out.push_str(
                "<table class=\"risk\"><thead><tr><th>Risk dimension</th><th>Grade</th>\
                 <th class=\"num\">Weight</th><th class=\"num\">Points</th></tr></thead><tbody>",
            );
            for (dimension, grade, points) in &parts {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td class=\"grade-{g}\">{g}</td><td class=\"num\">{}%</td>\
                     <td class=\"num\">{}</td></tr>",
                    esc(dimension.as_str()),
                    dimension.weight_percent(),
                    esc(points),
                    g = esc(grade),
                );
            }
            let _ = write!(
                out,
                "</tbody><tfoot><tr><th colspan=\"3\">Score</th><th class=\"num\">{score}</th>\
                 </tr></tfoot></table>"
            );
        }
        let _ = writeln!(
            out,
            "<p class=\"explanation\">{}</p>\
             <form method=\"post\" action=\"/console/approvals/decide\" class=\"decide\">{}\
             <input type=\"hidden\" name=\"id\" value=\"{}\">\
             <label>Reason <input type=\"text\" name=\"reason\" required maxlength=\"1024\" \
             placeholder=\"recorded in the audit log\"></label>\
             <button type=\"submit\" name=\"decision\" value=\"approve\" class=\"approve\">Approve</button>\
             <button type=\"submit\" name=\"decision\" value=\"deny\" class=\"deny\">Deny</button>\
             </form></article>",
            esc(&a.explanation),
            csrf_field(csrf),
            esc(&a.id),
        );
    }
    out.push_str("</section>\n");
}

/// The risk parts an approval's explanation names (`blast_radius high 27, ...`, written by the
/// core's `risk::Assessment::explanation`): each dimension, its grade and its weighted points.
fn risk_parts(explanation: &str) -> Vec<(Dimension, &str, &str)> {
    let Some(start) = explanation.find("risk ") else { return Vec::new() };
    let Some(colon) = explanation[start..].find("): ") else { return Vec::new() };
    let rest = &explanation[start + colon + 3..];
    let list = rest.split(';').next().unwrap_or("");
    let mut out = Vec::new();
    for part in list.split(", ") {
        let mut words = part.split_whitespace();
        let (Some(name), Some(grade), Some(points), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Vec::new();
        };
        let Some(dimension) = Dimension::ALL.into_iter().find(|d| d.as_str() == name) else {
            return Vec::new();
        };
        out.push((dimension, grade, points));
    }
    out
}

fn money(m: tollgate_core::money::Money) -> String {
    format!("${m}")
}

fn percent(bp: u64) -> String {
    format!("{}.{:02}%", bp / 100, bp % 100)
}

fn spend_section(
    out: &mut String,
    period: &str,
    budgets: &[BudgetStatus],
    groups: [&BTreeMap<String, Totals>; 3],
) {
    let _ =
        write!(out, "<section id=\"spend\"><h2>Spend in {}</h2>\n<h3>Budgets</h3>", esc(period));
    if budgets.is_empty() {
        out.push_str("<p class=\"empty\">The policy declares no budget.</p>");
    } else {
        out.push_str(
            "<table id=\"budgets\"><thead><tr><th>Budget</th><th>Scope</th><th>Key</th>\
             <th>Period</th><th class=\"num\">Spent</th><th class=\"num\">Reserved</th>\
             <th class=\"num\">Limit</th><th class=\"num\">Remaining</th><th>Used</th></tr>\
             </thead><tbody>",
        );
        for b in budgets {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td><meter min=\"0\" max=\"10000\" low=\"8000\" high=\"9500\" optimum=\"0\" \
                 value=\"{bp}\">{pct}</meter> {pct}</td></tr>",
                esc(&b.budget_id),
                b.scope.as_str(),
                esc(&b.key),
                b.period.as_str(),
                esc(&b.period_key),
                money(b.spent),
                money(b.reserved),
                money(b.limit),
                money(b.remaining),
                bp = b.utilization_bp.min(10_000),
                pct = percent(b.utilization_bp),
            );
        }
        out.push_str("</tbody></table>\n");
    }
    let kinds = [
        ("cost-centers", "By cost center", "Cost center", Scope::CostCenter),
        ("projects", "By project", "Project", Scope::Project),
        ("agents", "By agent", "Agent", Scope::Agent),
    ];
    for ((id, title, column, scope), totals) in kinds.into_iter().zip(groups) {
        let _ = write!(out, "<h3>{title}</h3>");
        if totals.is_empty() {
            out.push_str("<p class=\"empty\">No metered requests this period.</p>");
            continue;
        }
        let _ = write!(
            out,
            "<table id=\"spend-{id}\"><thead><tr><th>{column}</th><th class=\"num\">Requests</th>\
             <th class=\"num\">Input tokens</th><th class=\"num\">Output tokens</th>\
             <th class=\"num\">Cost</th><th>Against budget</th></tr></thead><tbody>"
        );
        for (key, t) in totals {
            let against: Vec<String> = budgets
                .iter()
                .filter(|b| b.scope == scope && b.key == *key)
                .map(|b| {
                    format!(
                        "{}: {} of {} {} ({})",
                        esc(&b.budget_id),
                        money(b.spent),
                        money(b.limit),
                        b.period.as_str(),
                        percent(b.utilization_bp)
                    )
                })
                .collect();
            let against =
                if against.is_empty() { "no budget".to_string() } else { against.join("<br>") };
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{against}</td></tr>",
                esc(key),
                t.requests,
                t.input_tokens,
                t.output_tokens,
                money(t.cost_usd),
            );
        }
        out.push_str("</tbody></table>\n");
    }
    out.push_str("</section>\n");
}

fn autonomy_section(out: &mut String, overall: &Counts, by: &[(&'static str, Counts)]) {
    let ratio = |c: &Counts| c.autonomy_bp().map(percent).unwrap_or_else(|| "–".into());
    let _ = write!(
        out,
        "<section id=\"autonomy\"><h2>Autonomy</h2>\
         <p class=\"ratio\"><span class=\"big\" id=\"autonomy-ratio\">{}</span> of {} actions ran \
         without a human ({} auto, {} sent for approval, {} denied; {} approved retries).</p>",
        ratio(overall),
        overall.total,
        overall.auto,
        overall.approval_required,
        overall.denied,
        overall.human_approved
    );
    if !by.is_empty() {
        out.push_str(
            "<table><thead><tr><th>Category</th><th class=\"num\">Auto</th>\
             <th class=\"num\">Approval required</th><th class=\"num\">Denied</th>\
             <th class=\"num\">Human approved</th><th class=\"num\">Total</th>\
             <th class=\"num\">Autonomy</th></tr></thead><tbody>",
        );
        for (name, c) in by {
            let _ = write!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td></tr>",
                esc(name),
                c.auto,
                c.approval_required,
                c.denied,
                c.human_approved,
                c.total,
                ratio(c)
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>\n");
}

fn agents_section(out: &mut String, disabled: &[String], csrf: &str) {
    let _ = write!(
        out,
        "<section id=\"disabled\"><h2>Disabled agents <span class=\"count\">{}</span></h2>",
        disabled.len()
    );
    if disabled.is_empty() {
        out.push_str("<p class=\"empty\">No agent is disabled.</p>");
    } else {
        out.push_str("<ul class=\"agents\">");
        for agent in disabled {
            let _ = write!(
                out,
                "<li><span class=\"agent\">{a}</span>\
                 <form method=\"post\" action=\"/console/agents/enable\">{}\
                 <input type=\"hidden\" name=\"agent\" value=\"{a}\">\
                 <button type=\"submit\" class=\"approve\">Re-enable</button></form></li>",
                csrf_field(csrf),
                a = esc(agent),
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>\n");
}

fn sign_in_page(status: StatusCode, error: Option<&str>) -> Response<Body> {
    let mut body = String::from("<main class=\"sign-in\"><h1>Tollgate console</h1>");
    if let Some(error) = error {
        let _ = write!(body, "<p class=\"error\" id=\"error\">{}</p>", esc(error));
    }
    body.push_str(
        "<form method=\"post\" action=\"/console/sign-in\">\
         <label>Your name <input type=\"text\" name=\"name\" required maxlength=\"128\" \
         autocomplete=\"username\"></label>\
         <label>Admin token <input type=\"password\" name=\"token\" required \
         autocomplete=\"current-password\"></label>\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The token is the admin API's bearer token. Your name is recorded in \
         the audit log with every decision you make here.</p></main>",
    );
    html_response(status, page("Sign in", &body))
}

fn error_page(status: StatusCode, message: &str) -> Response<Body> {
    let body = format!(
        "<main class=\"sign-in\"><h1>{}</h1><p class=\"error\" id=\"error\">{}</p>\
         <p><a href=\"/console\">Back to the console</a></p></main>",
        status.as_u16(),
        esc(message)
    );
    html_response(status, page(status.canonical_reason().unwrap_or("Error"), &body))
}

/// An HTML page with the console's security headers: no script, no framing, no caching.
fn html_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; \
             base-uri 'none'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    r
}

/// `303 See Other` to `location` (after a form, the browser follows with a `GET`).
fn redirect(location: &'static str) -> Response<Body> {
    let mut r = html_response(StatusCode::SEE_OTHER, String::new());
    r.headers_mut().insert(LOCATION, HeaderValue::from_static(location));
    r
}

fn put_cookie(r: &mut Response<Body>, cookie: &str) {
    if let Ok(v) = HeaderValue::from_str(cookie) {
        r.headers_mut().append(http::header::SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::post("/console/approvals/decide");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    #[test]
    fn posts_must_come_from_the_consoles_own_origin() {
        let host = ("host", "127.0.0.1:9090");
        let ok = |h: &[(&str, &str)]| same_origin(&post(h), over_tls(&post(h)));
        assert!(ok(&[host, ("origin", "http://127.0.0.1:9090")]));
        assert!(ok(&[host, ("origin", "HTTP://127.0.0.1:9090")]), "case does not matter");
        assert!(!ok(&[host, ("origin", "http://127.0.0.1:9091")]), "another port");
        assert!(!ok(&[host, ("origin", "http://evil.example")]));
        assert!(!ok(&[host, ("origin", "null")]));
        assert!(!ok(&[host, ("origin", "https://127.0.0.1:9090")]), "another scheme");
        assert!(
            ok(&[host, ("referer", "http://127.0.0.1:9090/console")]),
            "Referer without Origin"
        );
        assert!(!ok(&[host, ("referer", "http://127.0.0.1:9090.evil.example/console")]));
        assert!(!ok(&[host, ("referer", "http://127.0.0.1:9090")]), "no path: not a page of it");
        assert!(!ok(&[host]), "neither Origin nor Referer");
        assert!(!ok(&[("origin", "http://127.0.0.1:9090")]), "no host");
        // Behind a TLS-terminating proxy: the origin is https, and the cookie is Secure.
        let tls = [("host", "console.example"), ("x-forwarded-proto", "https")];
        assert!(over_tls(&post(&tls)));
        assert!(ok(&[tls[0], tls[1], ("origin", "https://console.example")]));
        assert!(!ok(&[tls[0], tls[1], ("origin", "http://console.example")]));
        assert!(!over_tls(&post(&[host])));
    }

    #[test]
    fn risk_parts_are_read_from_the_core_explanation() {
        let e = "default_require_approval; risk 44 (medium): blast_radius high 27, reversibility \
                 medium 12.5, data_sensitivity low 2, cost_impact low 1.5, historical_success \
                 low 1; approved if nobody answers within 15 min";
        let parts = risk_parts(e);
        assert_eq!(parts.len(), 5, "{parts:?}");
        assert_eq!(parts[0], (Dimension::ALL[0], "high", "27"));
        assert_eq!(parts[1].1, "medium");
        assert_eq!(parts[1].2, "12.5");
        assert_eq!(parts[4].2, "1");
        assert!(risk_parts("no breakdown here").is_empty());
        assert!(risk_parts("risk 3 (low): <script> x y").is_empty(), "unknown dimension");
    }

    #[test]
    fn a_hostile_agent_name_is_escaped_everywhere_it_is_shown() {
        let hostile = "<script>alert(1)</script>\"'&";
        let mut out = String::new();
        agents_section(&mut out, &[hostile.to_string()], "tok");
        let a = Approval {
            id: "apr_1".into(),
            request_id: "r".into(),
            created_at_ms: 0,
            expires_at_ms: 1,
            on_timeout: tollgate_core::risk::OnTimeout::Deny,
            use_within_ms: 1,
            agent: hostile.into(),
            cost_center: hostile.into(),
            project: hostile.into(),
            route: hostile.into(),
            action: hostile.into(),
            digest: "d".into(),
            risk_score: 7000,
            risk_band: hostile.into(),
            reason: hostile.into(),
            explanation: hostile.into(),
            state: State::Pending,
            decided_by: None,
            decided_at_ms: None,
            note: None,
            used_by_request: None,
        };
        approvals_section(&mut out, &[a], "tok");
        let mut totals = BTreeMap::new();
        totals.insert(hostile.to_string(), Totals::default());
        spend_section(&mut out, hostile, &[], [&totals, &totals, &totals]);
        assert!(!out.contains("<script"), "{out}");
        assert!(!out.contains("\"'&\""), "{out}");
        assert!(out.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;"), "{out}");
    }
}
