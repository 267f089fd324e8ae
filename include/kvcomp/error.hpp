// The one way kvcomp reports errors: kvcomp::Error, an exception with a message
// that names what is wrong. A call that throws leaves the object as it was.
#pragma once

#include <stdexcept>
#include <string>

namespace kvcomp {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error("kvcomp: " + what) {}
};

}  // namespace kvcomp
