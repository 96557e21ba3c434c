//go:build tools

// Keeps the API types required (and their sums in go.sum): controller-gen reads their package,
// nothing here imports it otherwise.
package monitoring

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
