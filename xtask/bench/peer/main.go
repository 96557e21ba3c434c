// Command peer is the MyResource controller written the way a kubebuilder project writes it, with
// controller-runtime: For(MyResource), Owns(ConfigMap), the default cache, CreateOrUpdate, a
// Normal event through the manager's events.k8s.io recorder when it creates or updates the
// ConfigMap (the operator's reason, action and note), and a status update. `cargo xtask bench`
// runs it against the same cluster as the Rust operator to compare convergence time, requests
// and memory. It is a benchmark peer, not part of the product.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/recorder"
)

var myResourceGVK = schema.GroupVersionKind{Group: "example.com", Version: "v1", Kind: "MyResource"}

func newMyResource() *unstructured.Unstructured {
	u := &unstructured.Unstructured{}
	u.SetGroupVersionKind(myResourceGVK)
	return u
}

// MyResourceReconciler keeps <name>-configmap holding spec.message and reports Ready.
type MyResourceReconciler struct {
	client.Client
	Recorder recorder.EventRecorder
}

func (r *MyResourceReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	resource := newMyResource()
	if err := r.Get(ctx, req.NamespacedName, resource); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	message, _, _ := unstructured.NestedString(resource.Object, "spec", "message")
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: req.Name + "-configmap", Namespace: req.Namespace}}
	result, err := controllerutil.CreateOrUpdate(ctx, r.Client, cm, func() error {
		if cm.Labels == nil {
			cm.Labels = map[string]string{}
		}
		cm.Labels["app.kubernetes.io/managed-by"] = "example-operator-peer"
		cm.Data = map[string]string{"message": message}
		return controllerutil.SetControllerReference(resource, cm, r.Scheme())
	})
	if err != nil {
		return ctrl.Result{}, err
	}
	// The operator's event for the same write: reason ConfigMap<Verb>, action <Verb>.
	var verb string
	switch result {
	case controllerutil.OperationResultCreated:
		verb = "Created"
	case controllerutil.OperationResultUpdated:
		verb = "Updated"
	}
	if verb != "" {
		r.Recorder.Eventf(resource, nil, corev1.EventTypeNormal, "ConfigMap"+verb, verb, "%s ConfigMap %s", verb, cm.Name)
	}
	generation := resource.GetGeneration()
	observed, _, _ := unstructured.NestedInt64(resource.Object, "status", "observedGeneration")
	phase, _, _ := unstructured.NestedString(resource.Object, "status", "phase")
	if phase == "Ready" && observed == generation {
		return ctrl.Result{}, nil
	}
	conditions := []metav1.Condition{}
	meta.SetStatusCondition(&conditions, metav1.Condition{
		Type: "Ready", Status: metav1.ConditionTrue, Reason: "ConfigMapSynced",
		Message: fmt.Sprintf("ConfigMap %s holds the message", cm.Name), ObservedGeneration: generation,
	})
	status := map[string]interface{}{
		"phase": "Ready", "configMapName": cm.Name, "observedGeneration": generation,
		"conditions": []interface{}{map[string]interface{}{
			"type": "Ready", "status": "True", "reason": "ConfigMapSynced", "message": conditions[0].Message,
			"lastTransitionTime": conditions[0].LastTransitionTime.UTC().Format("2006-01-02T15:04:05Z"),
			"observedGeneration": generation,
		}},
	}
	if err := unstructured.SetNestedField(resource.Object, status, "status"); err != nil {
		return ctrl.Result{}, err
	}
	return ctrl.Result{}, r.Status().Update(ctx, resource)
}

func main() {
	var concurrency int
	var namespace string
	flag.IntVar(&concurrency, "concurrency", 4, "MaxConcurrentReconciles")
	var userAgent string
	flag.StringVar(&namespace, "namespace", "", "watch only this namespace")
	flag.StringVar(&userAgent, "user-agent", "", "User-Agent of every request (the benchmark counts requests by it)")
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseDevMode(false)))

	options := ctrl.Options{Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0"}
	if namespace != "" {
		options.Cache.DefaultNamespaces = map[string]cache.Config{namespace: {}}
	}
	config := ctrl.GetConfigOrDie()
	if userAgent != "" {
		config.UserAgent = userAgent
	}
	mgr, err := ctrl.NewManager(config, options)
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating manager:", err)
		os.Exit(1)
	}
	err = ctrl.NewControllerManagedBy(mgr).
		For(newMyResource()).
		Owns(&corev1.ConfigMap{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: concurrency}).
		Complete(&MyResourceReconciler{Client: mgr.GetClient(), Recorder: mgr.GetEventRecorder("example-operator-peer")})
	if err != nil {
		fmt.Fprintln(os.Stderr, "creating controller:", err)
		os.Exit(1)
	}
	if err := mgr.Start(ctrl.SetupSignalHandler()); err != nil {
		fmt.Fprintln(os.Stderr, "running manager:", err)
		os.Exit(1)
	}
}
