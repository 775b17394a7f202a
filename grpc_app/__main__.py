"""python -m grpc_app: run the gRPC server until SIGTERM or SIGINT."""

from grpc_app.server import main

if __name__ == "__main__":
    main()
