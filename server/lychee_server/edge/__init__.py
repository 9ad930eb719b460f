"""The gRPC edge: where protobuf messages become typed domain values and errors become statuses.

``codec`` parses unary requests and renders responses, ``stream`` assembles ``RerankStream``
calls, ``validation`` holds the one rule table both apply, and ``status`` renders every error
as an AIP-193 ``grpc.Status``. Nothing past this package imports protobuf types.
"""
