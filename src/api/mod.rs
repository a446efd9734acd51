//! The HTTP layer: REST handlers under `/api/v1`, the WebSocket, health and OpenAPI.
//!
//! Handlers validate input, check the caller's rights, and send messages to actors
//! (through `Shards` for storage). They never touch a pool, never block, and never
//! format an error by hand: every error is an `ApiError` (RFC 9457 problem body),
//! including the ones actix-web raises for bodies, paths and queries it cannot parse.

pub mod conflicts;
pub mod extract;
pub mod network;
pub mod profiles;
pub mod projects;
pub mod recommendations;
pub mod session;
pub mod sync;
pub mod users;
pub mod ws;

#[cfg(test)]
mod decode_props;

use actix::Addr;
use actix_cors::Cors;
use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::middleware::{Condition, DefaultHeaders};
use actix_web::{HttpResponse, HttpResponseBuilder, web};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

use crate::actors::auth::{AuthActor, TokenVerifier};
use crate::actors::event_hub::EventHub;
use crate::actors::shards::Shards;
use crate::actors::supervisor::NodeSupervisor;
use crate::problem::ApiError;
use crate::validate::limits;
use crate::vclock::VectorClock;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub shards: Shards,
    pub auth: Addr<AuthActor>,
    /// Checks access tokens in the worker itself; the AuthActor keeps it up to date.
    pub tokens: std::sync::Arc<TokenVerifier>,
    pub hub: Addr<EventHub>,
    pub supervisor: Addr<NodeSupervisor>,
    pub sync: Addr<crate::actors::sync::SyncActor>,
    /// Events a WebSocket client may fall behind by before it is disconnected.
    pub ws_queue: usize,
    /// Neighbours a recommendation run keeps per user and mode (the largest `limit`).
    pub recommend_k: usize,
}

/// A 400 with a validation message.
pub(crate) fn bad(message: String) -> ApiError {
    ApiError::BadRequest(message)
}

/// A response builder carrying the row version as its `ETag`.
pub(crate) fn tagged(mut builder: HttpResponseBuilder, clock: &VectorClock) -> HttpResponseBuilder {
    builder.insert_header(("ETag", clock.etag()));
    builder
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "CosmicSyncCore API", description = "REST API of a CosmicSyncCore node. Errors are RFC 9457 problem details (application/problem+json)."),
    paths(
        users::create, users::get, users::update,
        profiles::get, profiles::update,
        projects::create, projects::get, projects::update, projects::delete, projects::list,
        session::login, session::logout,
        network::status, network::healthz, network::readyz,
        sync::status,
        conflicts::list,
        recommendations::users,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().limit(limits::BODY_MAX).error_handler(|err, _| {
        let api = match &err {
            JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
                ApiError::PayloadTooLarge(format!("the request body is larger than {} bytes", limits::BODY_MAX))
            }
            JsonPayloadError::ContentType => {
                ApiError::UnsupportedMediaType("send the request body as application/json".into())
            }
            JsonPayloadError::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")),
            other => ApiError::BadRequest(format!("unreadable request body: {other}")),
        };
        api.into()
    })
}

fn path_config() -> web::PathConfig {
    web::PathConfig::default()
        .error_handler(|err: PathError, _| ApiError::BadRequest(format!("malformed id in the path: {err}")).into())
}

fn query_config() -> web::QueryConfig {
    web::QueryConfig::default()
        .error_handler(|err: QueryPayloadError, _| ApiError::BadRequest(format!("invalid query string: {err}")).into())
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such endpoint; see /api/docs".into()))
}

async fn method_not_allowed() -> HttpResponse {
    let problem = crate::problem::Problem {
        kind: "urn:cosmicsync:problem:method-not-allowed".into(),
        title: "Method Not Allowed".into(),
        status: 405,
        detail: "this endpoint does not support that method; see /api/docs".into(),
    };
    HttpResponse::MethodNotAllowed().content_type("application/problem+json").json(problem)
}

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path.to_owned()).default_service(web::to(method_not_allowed));
    cfg.app_data(json_config())
        .app_data(path_config())
        .app_data(query_config())
        .service(resource("/healthz").route(web::get().to(network::healthz)))
        .service(resource("/readyz").route(web::get().to(network::readyz)))
        .service(SwaggerUi::new("/api/docs/{_:.*}").url("/api/v1/openapi.json", ApiDoc::openapi()))
        .service(
            web::scope("/api/v1")
                .wrap(DefaultHeaders::new().add(("Cache-Control", "no-store")))
                .service(resource("/users").route(web::post().to(users::create)))
                .service(resource("/users/{id}").route(web::get().to(users::get)).route(web::put().to(users::update)))
                .service(
                    resource("/profiles/{id}")
                        .route(web::get().to(profiles::get))
                        .route(web::put().to(profiles::update)),
                )
                .service(
                    resource("/projects").route(web::get().to(projects::list)).route(web::post().to(projects::create)),
                )
                .service(
                    resource("/projects/{id}")
                        .route(web::get().to(projects::get))
                        .route(web::put().to(projects::update))
                        .route(web::delete().to(projects::delete)),
                )
                .service(resource("/auth/login").route(web::post().to(session::login)))
                .service(resource("/auth/logout").route(web::post().to(session::logout)))
                .service(resource("/network/status").route(web::get().to(network::status)))
                .service(resource("/sync/status").route(web::get().to(sync::status)))
                .service(resource("/conflicts").route(web::get().to(conflicts::list)))
                .service(resource("/recommendations/users").route(web::get().to(recommendations::users)))
                .service(resource("/ws").route(web::get().to(ws::ws_endpoint)))
                .default_service(web::to(not_found)),
        )
        .default_service(web::to(not_found));
}

/// Headers on every response.
pub fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("Strict-Transport-Security", "max-age=31536000"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Referrer-Policy", "no-referrer"))
}

/// Cross-origin requests: off (no CORS headers at all, so browsers keep the same-origin
/// rule) unless origins are configured; then only those, with the methods and headers
/// the API uses.
pub fn cors(origins: &[String]) -> Condition<Cors> {
    use actix_web::http::header;
    let mut cors = Cors::default()
        .allowed_methods(["GET", "POST", "PUT", "DELETE"])
        .allowed_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::IF_MATCH])
        .expose_headers([header::ETAG, header::RETRY_AFTER])
        .max_age(600);
    for origin in origins {
        // Checked by the config layer: a scheme and a host, no wildcard.
        cors = cors.allowed_origin(origin);
    }
    Condition::new(!origins.is_empty(), cors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_endpoint() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/api/v1/users",
            "/api/v1/users/{id}",
            "/api/v1/profiles/{id}",
            "/api/v1/projects",
            "/api/v1/projects/{id}",
            "/api/v1/auth/login",
            "/api/v1/auth/logout",
            "/api/v1/network/status",
            "/api/v1/sync/status",
            "/api/v1/conflicts",
            "/api/v1/recommendations/users",
        ] {
            assert!(paths.contains_key(p), "{p} missing from the OpenAPI document");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
