#include "child.hpp"

#include <iostream>

namespace natspubsub::bench {

int child_main(int, char**) {
  std::cerr << "natspubsub-bench --child: no child modes yet\n";
  return 2;
}

}  // namespace natspubsub::bench
