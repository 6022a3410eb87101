"""The OpenAPI document of every HTTP route, served at /openapi.json."""

from __future__ import annotations

from typing import Any

from gateway.config import PROTOCOL, Config

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": "#/components/responses/Error"} for s in statuses}


def openapi(config: Config) -> dict[str, Any]:
    code_body = {
        "type": "object",
        "required": ["code"],
        "properties": {"code": {"type": "string"}, "language": {"type": "string", "default": "python"}},
    }
    permalink = {
        "type": "object",
        "required": ["id", "url"],
        "properties": {"id": {"type": "string"}, "url": {"type": "string"}},
    }
    file_entry = {
        "type": "object",
        "required": ["name", "url", "size", "mime"],
        "properties": {
            "name": {"type": "string"},
            "url": {"type": ["string", "null"]},
            "size": {"type": ["integer", "null"]},
            "mime": {"type": "string"},
            "error": {"type": "object"},
        },
    }
    service_result = {
        "type": "object",
        "required": ["success", "stdout", "stderr", "outputs", "files", "permalink"],
        "properties": {
            "success": {"type": "boolean"},
            "stdout": {"type": "string"},
            "stderr": {"type": "string"},
            "outputs": {"type": "array", "items": {"type": "object"}},
            "error": {"type": "object"},
            "files": {"type": "array", "items": file_entry},
            "permalink": {"oneOf": [permalink, {"type": "null"}]},
        },
    }
    id_param = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cellgate",
            "version": PROTOCOL,
            "description": "Run code in Jupyter kernels. The realtime API is Socket.IO at /socket.io/; "
            "see docs/PROTOCOL.md.",
        },
        "servers": [{"url": config.public_url or "/"}],
        "paths": {
            "/health": {
                "get": {
                    "summary": "Whether this node can serve",
                    "responses": {
                        "200": _json({"type": "object"}, "serving"),
                        "503": _json({"type": "object"}, "cannot serve"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {}}}},
                }
            },
            "/permalink": {
                "post": {
                    "summary": "Store code; the same language and code always give the same id",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": code_body}}},
                    "responses": {
                        "201": _json(permalink, "stored"),
                        "202": _json(permalink, "kept by the server until the store takes it; opens once stored"),
                        **_errors(400, 413, 503),
                    },
                }
            },
            "/permalink/{id}": {
                "get": {
                    "summary": "The stored code",
                    "parameters": id_param,
                    "responses": {"200": _json(code_body, "the code"), **_errors(404)},
                }
            },
            "/p/{id}": {
                "get": {
                    "summary": "A page with the stored code ready to run",
                    "parameters": id_param,
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}, **_errors(404)},
                }
            },
            "/service": {
                "post": {
                    "summary": "Run code once on a fresh kernel and return everything it produced",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": code_body},
                            "application/x-www-form-urlencoded": {"schema": code_body},
                        },
                    },
                    "responses": {"200": _json(service_result, "ran"), **_errors(400, 413, 429, 503, 504)},
                }
            },
            "/upload": {
                "post": {
                    "summary": "Put files in a live session's working directory",
                    "security": [{"resumeToken": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"file": {"type": "string", "format": "binary"}},
                                }
                            }
                        },
                    },
                    "responses": {"200": _json({"type": "object"}, "stored"), **_errors(400, 401, 413)},
                }
            },
            "/files/{token}/{name}": {
                "get": {
                    "summary": "A file a kernel wrote: its bytes, or a redirect to a freshly presigned S3 URL",
                    "parameters": [
                        {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}},
                        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    ],
                    "responses": {
                        "200": {"description": "the exact bytes (local store, or --file-delivery proxy)"},
                        "302": {"description": "to a presigned URL valid for --presign-expiry seconds (S3)"},
                        **_errors(404, 503),
                    },
                }
            },
            "/admin/sessions": {
                "get": {
                    "summary": "Every live session: node, kernel host, age, client, origin, state (admin)",
                    "security": [{"adminToken": []}],
                    "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 10000}}],
                    "responses": {"200": _json({"type": "object"}, "the sessions"), **_errors(400, 401, 404)},
                }
            },
            "/admin/sessions/{id}": {
                "delete": {
                    "summary": "End a session; its client gets kernel shutdown with reason admin (admin)",
                    "security": [{"adminToken": []}],
                    "parameters": id_param,
                    "responses": {"202": _json({"type": "object"}, "ending"), **_errors(401, 404)},
                }
            },
            "/admin/nodes": {
                "get": {
                    "summary": "The gateway nodes and kernel hosts (admin)",
                    "security": [{"adminToken": []}],
                    "responses": {"200": _json({"type": "object"}, "nodes and hosts"), **_errors(401, 404)},
                }
            },
            "/admin/nodes/{id}/drain": {
                "post": {
                    "summary": "Drain a node: its clients move to other nodes, then it stops (admin)",
                    "security": [{"adminToken": []}],
                    "parameters": id_param,
                    "responses": {"202": _json({"type": "object"}, "draining"), **_errors(401, 404)},
                }
            },
            "/": {"get": {"summary": "Demo page", "responses": {"200": {"description": "HTML"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "JSON"}}}},
        },
        "components": {
            "responses": {"Error": _json(ERROR, "an error with a code and a message")},
            "securitySchemes": {
                "resumeToken": {"type": "http", "scheme": "bearer"},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "CELLGATE_ADMIN_TOKEN"},
            },
        },
    }
