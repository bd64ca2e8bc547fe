#include "common/interrupt.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <string>

namespace pq {
namespace {

TEST(Interrupt, CheckPointThrowsOnlyAfterARequest) {
  request_interrupt(0);
  EXPECT_NO_THROW(throw_if_interrupted());
  request_interrupt(SIGTERM);
  EXPECT_EQ(interrupt_signal(), SIGTERM);
  try {
    throw_if_interrupted();
    ADD_FAILURE() << "no Interrupted thrown";
  } catch (const Interrupted& e) {
    EXPECT_EQ(e.signal_number(), SIGTERM);
    EXPECT_NE(std::string(e.what()).find("stopped by SIGTERM"), std::string::npos) << e.what();
  }
  request_interrupt(0);
}

TEST(Interrupt, FirstSignalIsRecordedNotFatal) {
  install_interrupt_handlers();
  request_interrupt(0);
  ::raise(SIGINT);  // with the default action this would end the test program
  EXPECT_EQ(interrupt_signal(), SIGINT);
  EXPECT_THROW(throw_if_interrupted(), Interrupted);
  request_interrupt(0);
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
}

}  // namespace
}  // namespace pq
