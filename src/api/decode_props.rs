//! Property tests of the request decoders and the validation layer, in process: generated
//! bodies, ids and queries go through the real actix-web extractors with the node's own
//! decoder configuration (`json_config`, `path_config`, `query_config`) and then through
//! the same `validated*` functions the handlers call.
//!
//! What must hold for any input: no panic; the answer is either acceptance or a `4xx`
//! problem body (never a `5xx`); input that breaks a documented rule is refused; and what
//! is accepted carries no character PostgreSQL cannot store or a field does not allow.
//! The storage behind the handlers is out of scope here: `tests/bad_input.rs` covers it
//! against a real node. Test-only; it must never grow a mock of a component users run.

use actix_web::{App, HttpResponse, test as actix_test, web};
use proptest::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use super::projects::ListParams;
use super::{profiles, projects, session, users};
use crate::model::{LoginRequest, NewProject, NewUser, ProfileUpdate, ProjectUpdate, UserUpdate};
use crate::problem::ApiError;
use crate::validate::limits;

/// The strings an accepted body would store, by field (answered as JSON so the
/// properties can check them).
fn accepted(fields: Vec<(&str, Option<String>)>, lists: Vec<(&str, Option<Vec<String>>)>) -> HttpResponse {
    let mut out = serde_json::Map::new();
    for (name, value) in fields {
        out.insert(name.into(), json!(value));
    }
    for (name, value) in lists {
        out.insert(name.into(), json!(value));
    }
    HttpResponse::Ok().json(out)
}

async fn new_user(body: web::Json<NewUser>) -> Result<HttpResponse, ApiError> {
    let u = users::validated_new(body.into_inner())?;
    Ok(accepted(vec![("username", Some(u.username)), ("email", Some(u.email))], vec![]))
}

async fn user_update(body: web::Json<UserUpdate>) -> Result<HttpResponse, ApiError> {
    let u = users::validated_update(body.into_inner())?;
    Ok(accepted(vec![("username", u.username), ("email", u.email)], vec![]))
}

async fn profile_update(body: web::Json<ProfileUpdate>) -> Result<HttpResponse, ApiError> {
    let p = profiles::validated(body.into_inner())?;
    Ok(accepted(vec![("name", p.name), ("bio", p.bio)], vec![("skills", p.skills), ("interests", p.interests)]))
}

async fn new_project(body: web::Json<NewProject>) -> Result<HttpResponse, ApiError> {
    let p = projects::validated_new(body.into_inner())?;
    Ok(accepted(vec![("name", Some(p.name)), ("description", Some(p.description))], vec![("tags", Some(p.tags))]))
}

async fn project_update(body: web::Json<ProjectUpdate>) -> Result<HttpResponse, ApiError> {
    let p = projects::validated_update(body.into_inner())?;
    Ok(accepted(vec![("name", p.name), ("description", p.description)], vec![("tags", p.tags)]))
}

async fn login(body: web::Json<LoginRequest>) -> HttpResponse {
    // Only the name reaches storage, and only past the handler's own check.
    let login = body.into_inner();
    let username = session::precheck(&login).ok().map(|()| login.username);
    accepted(vec![("username", username)], vec![])
}

async fn by_id(id: web::Path<Uuid>) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "id": id.into_inner() }))
}

async fn list(params: web::Query<ListParams>) -> Result<HttpResponse, ApiError> {
    let ListParams { creator_id, limit, cursor } = params.into_inner();
    let q = projects::page_query(creator_id, cursor, limit)?;
    Ok(HttpResponse::Ok().json(json!({ "creator_id": q.creator, "limit": q.limit, "cursor": q.before })))
}

/// The body routes: path, and which fields are multi-line text.
const BODY_ROUTES: [(&str, &[&str]); 6] = [
    ("/users", &[]),
    ("/user-update", &[]),
    ("/profile-update", &["bio"]),
    ("/projects", &["description"]),
    ("/project-update", &["description"]),
    ("/login", &[]),
];

/// One answer: its status and, for a 200, the accepted values.
struct Answer {
    status: u16,
    body: Value,
}

/// Sends `requests` to the routes above, in process, with the node's decoder settings.
/// Every answer is checked for the rules every answer keeps: never a `5xx`, always
/// JSON, and every error a problem body carrying its own status.
fn answers(requests: Vec<actix_test::TestRequest>) -> Vec<Answer> {
    actix_web::rt::System::new().block_on(async move {
        let app = actix_test::init_service(
            App::new()
                .app_data(super::json_config())
                .app_data(super::path_config())
                .app_data(super::query_config())
                .route("/users", web::post().to(new_user))
                .route("/user-update", web::post().to(user_update))
                .route("/profile-update", web::post().to(profile_update))
                .route("/projects", web::post().to(new_project))
                .route("/project-update", web::post().to(project_update))
                .route("/login", web::post().to(login))
                .route("/ids/{id}", web::get().to(by_id))
                .route("/list", web::get().to(list)),
        )
        .await;
        let mut out = Vec::new();
        for req in requests {
            let res = actix_test::call_service(&app, req.to_request()).await;
            let status = res.status().as_u16();
            let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let bytes = actix_test::read_body(res).await;
            assert!(status < 500, "server error {status}: {}", String::from_utf8_lossy(&bytes));
            let body: Value = serde_json::from_slice(&bytes).expect("every answer is JSON");
            if status >= 400 {
                assert!(ct.starts_with("application/problem+json"), "{status} with content type {ct}");
                assert_eq!(body["status"], status, "problem status");
                assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "problem without detail: {body}");
            } else {
                assert_eq!(status, 200);
            }
            out.push(Answer { status, body });
        }
        out
    })
}

/// A JSON `POST` to one of the routes.
fn post(route: &str, body: impl Into<Vec<u8>>) -> actix_test::TestRequest {
    actix_test::TestRequest::post()
        .uri(route)
        .insert_header(("content-type", "application/json"))
        .set_payload(body.into())
}

/// The same body to every body route; answers in `BODY_ROUTES` order.
fn to_every_route(body: Vec<u8>) -> Vec<Answer> {
    answers(BODY_ROUTES.iter().map(|(route, _)| post(route, body.clone())).collect())
}

/// Status of one request.
fn status_of(req: actix_test::TestRequest) -> u16 {
    answers(vec![req])[0].status
}

/// Any JSON value, nested a few levels, with strings from `strings()`.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        strings().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(field_names(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Strings as a hostile client sends them: any characters, with control characters,
/// NULs and SQL metacharacters made common.
fn strings() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z0-9_.@-]{0,40}",
        "[\\x00-\\x1f\\x7f'\";%_$\\\\ a-z]{0,40}",
        Just("'; DROP TABLE users; --".to_owned()),
    ]
}

/// Real field names (so generated objects get past `deny_unknown_fields`) and others.
fn field_names() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "username",
            "email",
            "password",
            "name",
            "bio",
            "skills",
            "interests",
            "description",
            "tags"
        ])
        .prop_map(str::to_owned),
        "[a-z_]{0,8}",
    ]
}

/// Objects of real fields with string or list values: the input that reaches validation.
fn near_valid() -> impl Strategy<Value = Value> {
    let value = prop_oneof![
        4 => strings().prop_map(Value::from),
        2 => prop::collection::vec(strings(), 0..60).prop_map(Value::from),
        1 => any_json(),
    ];
    prop::collection::btree_map(field_names(), value, 0..5).prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Checks that what a route accepted is storable and within the rules of its field.
fn check_accepted(answer: &Answer, multi_line: &[&str]) {
    let Some(fields) = answer.body.as_object() else { panic!("accepted body is not an object: {}", answer.body) };
    for (field, value) in fields {
        let items: Vec<&str> = match value {
            Value::String(s) => vec![s.as_str()],
            Value::Array(list) => {
                assert!(list.len() <= limits::LIST_ITEMS_MAX, "{field}: {} items accepted", list.len());
                list.iter().map(|v| v.as_str().expect("string item")).collect()
            }
            _ => continue,
        };
        for s in items {
            assert!(!s.contains('\0'), "{field}: a NUL was accepted: {s:?}");
            let allowed = |c: char| multi_line.contains(&field.as_str()) && matches!(c, '\n' | '\t' | '\r');
            assert!(
                !s.chars().any(|c| c.is_control() && !allowed(c)),
                "{field}: a control character was accepted: {s:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_get_an_answer_never_a_server_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for (a, (_, multi_line)) in to_every_route(bytes).iter().zip(BODY_ROUTES) {
            if a.status == 200 {
                check_accepted(a, multi_line);
            }
        }
    }

    #[test]
    fn arbitrary_json_is_decoded_and_validated_safely(value in prop_oneof![any_json(), near_valid()]) {
        for (a, (_, multi_line)) in to_every_route(value.to_string().into_bytes()).iter().zip(BODY_ROUTES) {
            if a.status == 200 {
                check_accepted(a, multi_line);
            }
        }
    }

    #[test]
    // Inside the value: at its ends a whitespace control (a vertical tab) is trimmed off,
    // as documented, and what is stored is clean.
    fn a_control_character_in_a_field_is_refused(
        prefix in "[a-z]{1,10}", control in "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f]", suffix in "[a-z]{1,10}",
    ) {
        let bad = format!("{prefix}{control}{suffix}");
        for (route, body) in [
            ("/users", json!({ "username": bad, "email": "a@example.org", "password": "correct horse" })),
            ("/users", json!({ "username": "ada", "email": format!("{bad}@example.org"), "password": "correct horse" })),
            ("/user-update", json!({ "username": bad })),
            ("/profile-update", json!({ "name": bad })),
            ("/profile-update", json!({ "bio": bad })),
            ("/profile-update", json!({ "skills": ["ok", bad] })),
            ("/projects", json!({ "name": bad })),
            ("/projects", json!({ "name": "n", "description": bad })),
            ("/project-update", json!({ "tags": [bad] })),
        ] {
            prop_assert_eq!(status_of(post(route, body.to_string())), 400, "{} {}", route, body);
        }
    }

    #[test]
    fn too_many_list_items_are_refused(n in (limits::LIST_ITEMS_MAX + 1)..2_000usize) {
        let list: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        for (route, field) in [("/profile-update", "skills"), ("/profile-update", "interests"), ("/project-update", "tags")] {
            prop_assert_eq!(status_of(post(route, json!({ field: list }).to_string())), 400);
        }
        prop_assert_eq!(status_of(post("/projects", json!({ "name": "n", "tags": list }).to_string())), 400);
    }

    #[test]
    fn deep_nesting_is_refused(depth in 129usize..20_000) {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        for a in to_every_route(format!(r#"{{"name":{nested}}}"#).into_bytes()) {
            prop_assert!([400, 413].contains(&a.status));
        }
    }

    #[test]
    fn malformed_ids_and_queries_are_refused(junk in "[^/?#]{1,60}") {
        prop_assume!(Uuid::parse_str(&junk).is_err());
        let escaped: String = junk.bytes().map(|b| format!("%{b:02X}")).collect();
        let get = |uri: String| actix_test::TestRequest::get().uri(&uri);
        prop_assert_eq!(status_of(get(format!("/ids/{escaped}"))), 400);
        for query in [format!("limit={escaped}"), format!("cursor={escaped}"), format!("creator_id={escaped}")] {
            let status = status_of(get(format!("/list?{query}")));
            // A junk limit may still be a number in range; anything else is refused.
            let in_range = junk.parse::<usize>().is_ok_and(|n| (1..=limits::PAGE_MAX).contains(&n));
            prop_assert!(status == 400 || (query.starts_with("limit") && in_range), "{} -> {}", query, status);
        }
    }
}

#[test]
fn a_body_over_the_limit_is_refused_as_too_large() {
    let body = json!({ "name": "x".repeat(limits::BODY_MAX) }).to_string().into_bytes();
    for (a, (route, _)) in to_every_route(body).iter().zip(BODY_ROUTES) {
        assert_eq!(a.status, 413, "{route}");
    }
}

#[test]
fn valid_bodies_are_accepted() {
    // The harness can say yes: the properties above are not passing on refusals alone.
    let valid = [
        ("/users", json!({ "username": "ada", "email": "ada@example.org", "password": "correct horse" })),
        ("/user-update", json!({ "email": "o'brien%$1@example.org" })),
        ("/profile-update", json!({ "bio": "two\nlines", "skills": ["a", " a "] })),
        ("/projects", json!({ "name": "'; DROP TABLE users; --" })),
        ("/project-update", json!({ "tags": [] })),
        ("/login", json!({ "username": "ada", "password": "x" })),
    ];
    let mut requests: Vec<_> = valid.iter().map(|(route, body)| post(route, body.to_string())).collect();
    requests.push(actix_test::TestRequest::get().uri(&format!("/ids/{}", Uuid::now_v7())));
    requests.push(actix_test::TestRequest::get().uri("/list?limit=10"));
    let statuses: Vec<u16> = answers(requests).iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200; 8]);
    let profile = &answers(vec![post("/profile-update", valid[2].1.to_string())])[0].body;
    assert_eq!(profile["skills"], json!(["a"]), "labels are trimmed and deduplicated");
}
