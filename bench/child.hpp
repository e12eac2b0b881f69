#pragma once
// Child processes of the benchmark (`natspubsub-bench --child MODE ...`): work that must be
// measured in a process of its own, such as a consumer's peak RSS.
namespace natspubsub::bench {

/// argv[0] is "--child"; returns the process exit code.
int child_main(int argc, char** argv);

}  // namespace natspubsub::bench
