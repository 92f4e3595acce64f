"""Everything that starts, adapts to, patches or quiets Ray and torch.distributed; the rest of the package uses
Ray's public API only (tests/test_architecture.py checks it, and tests/test_runtime.py pins each adaptation
to the Ray it was written against). Each adaptation, the Ray behaviour it changes, and why:

* ray_env.init_ray: a command's private Ray on loopback with token authentication, whatever was imported
  first (Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import; otherwise it listens on the network).
* ray_env.keep_serve_replica_on_loopback: Serve replicas' inter-deployment gRPC server on 127.0.0.1 on a
  private Ray (Serve binds it to every interface).
* ray_env.address_own_cluster: workers' address-less state-API calls (Ray Train's placement-group cleaner)
  ask their own cluster, not whichever Ray auto-detection finds first.
* rendezvous.bound_torch_config: the Train workers' TCPStore and gloo/NCCL sockets on each node's Ray address
  (torch's store listens on every interface); "cpu:gloo,cuda:nccl" on GPUs.
* train_fit.input_errors_fail_fast: Ray Train's failure policy, except that input errors are not retried.
* train_fit.ctrl_c_as_keyboard_interrupt: Ctrl-C during fit() ends as KeyboardInterrupt (Ray Train's handler
  calls sys.exit(0)).
* train_fit.quiet_train_worker, quiet, errors.hide_duplicate_error_reports: Ray's duplicate error reports and
  known-harmless chatter off the console (SEATER_VERBOSE=1 shows everything).
* errors: the command line's one error path, unwrapping Ray's exception wrappers to the user's error.
* capacity.autoscaling_ceiling: reads the autoscaler's node groups from Ray's GCS state (no public API) to
  tell an autoscaling cluster from a fixed one before refusing a stage it can never run.
"""
