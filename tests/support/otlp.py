"""A real OTLP/HTTP trace receiver for the tests that check a request's spans (tenants, Ray Serve)."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on loopback: what the server's exporter sends, decoded with the protocol's
    own protobuf messages (opentelemetry-proto)."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        received = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                received.extend(span for resource in request.resource_spans for scope in resource.scope_spans
                                for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def in_trace(self, trace_id: str) -> list:
        """The spans received so far in that trace (hex id)."""
        return [s for s in list(self.spans) if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.httpd.shutdown()
